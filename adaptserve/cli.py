"""Command line: `adaptserve serve`, `generate` and `bench serve|offline|decode|precision|plot`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from adaptserve.config import ConfigError
from adaptserve.control_args import add_control_args, control_options
from adaptserve.kernel_args import add_kernel_args, kernel_options, precision_options
from adaptserve.kv_args import add_kv_args, kv_options
from adaptserve.spec_args import add_spec_args, spec_options


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="HF folder, .gguf file or preset; default: embedded SmolLM2"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None, help="KV budget; default: auto")
    parser.add_argument(
        "--precision-policy",
        default="native",
        choices=["native", "bf16", "fp8", "int4", "adaptive"],
        help="weight precision of every step, or adaptive per decode step from the model's confidence",
    )
    parser.add_argument(
        "--weight-formats", default="", help="extra weight formats to hold, e.g. fp8,int4 (memory permitting)"
    )
    parser.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="hold the LM head in the extra weight formats too (default: it stays native)",
    )
    add_kernel_args(parser)
    add_control_args(parser)
    add_spec_args(parser)
    add_kv_args(parser)


def _engine_options(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": not args.no_prefix_caching,
        "kv_cache_memory_gib": args.kv_cache_memory_gib,
        **precision_options(args),
        **kernel_options(args),
        **control_options(args),
        **spec_options(args),
        **kv_options(args),
    }


def _generate(args: argparse.Namespace) -> int:
    from adaptserve import LLM, SamplingParams

    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("error: give a prompt or --prompts-file", file=sys.stderr)
        return 2
    options = _engine_options(args)
    llm = LLM(options.pop("model"), **options)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        n=args.n,
    )
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        for completion in output.outputs:
            if args.json:
                print(
                    json.dumps(
                        {"prompt": prompt, "text": completion.text, "finish_reason": completion.finish_reason}
                    )
                )
            else:
                print(f">>> {prompt}\n{completion.text}\n[{completion.finish_reason}]")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from adaptserve.config import EngineConfig
    from adaptserve.server.config import AdmissionConfig, ServerConfig, parse_slos
    from adaptserve.server.launcher import serve

    options = _engine_options(args)
    options["model"] = args.model_path or args.model
    options["policy"] = args.scheduling_policy
    engine_config = EngineConfig.from_flat(**options)
    admission = AdmissionConfig(
        enabled=args.admission == "slo",
        tiers=parse_slos(args.ttft_slo),
        max_waiting_requests=args.max_waiting_requests,
        max_waiting_tokens=args.max_waiting_tokens,
    )
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        drain_timeout_s=args.drain_timeout,
        admission=admission,
    )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(engine_config, server_config, log_level=args.log_level)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        from adaptserve.bench.serve import run_serve_benchmark as run
    elif args.bench_command == "offline":
        from adaptserve.bench.offline import run_offline_benchmark as run
    elif args.bench_command == "decode":
        from adaptserve.bench.decode import run_decode_benchmark as run
    elif args.bench_command == "prefill":
        from adaptserve.bench.prefill import run_prefill_benchmark as run
    elif args.bench_command == "startup":
        from adaptserve.bench.startup import run_startup_benchmark as run
    elif args.bench_command == "precision":
        from adaptserve.bench.precision_cli import run_precision_quality_benchmark as run
    elif args.bench_command == "spec":
        from adaptserve.bench.spec import run_spec_benchmark as run
    elif args.bench_command == "kv":
        from adaptserve.bench.kv_cli import run_kv_benchmark as run
    else:
        from adaptserve.bench.plot import run_plot as run
    run(args)
    return 0


def _add_bench_commands(commands) -> None:
    from adaptserve.bench.decode import add_decode_args
    from adaptserve.bench.kv_cli import add_kv_bench_args
    from adaptserve.bench.offline import add_offline_args
    from adaptserve.bench.plot import add_plot_args
    from adaptserve.bench.precision_cli import add_precision_args
    from adaptserve.bench.prefill import add_prefill_args
    from adaptserve.bench.serve import add_serve_args
    from adaptserve.bench.spec import add_spec_bench_args
    from adaptserve.bench.startup import add_startup_args

    bench = commands.add_parser("bench", help="benchmarks; results go to docs/benchmarks/")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    serve = bench_commands.add_parser(
        "serve", help="vLLM-compatible serving benchmark against any OpenAI-compatible server"
    )
    add_serve_args(serve)
    offline = bench_commands.add_parser(
        "offline", help="in-process throughput on a workload, beside transformers"
    )
    add_offline_args(offline)
    _add_engine_args(offline)
    decode = bench_commands.add_parser(
        "decode", help="decode step time per batch size beside the bandwidth floor"
    )
    add_decode_args(decode)
    _add_engine_args(decode)
    prefill = bench_commands.add_parser("prefill", help="long-prompt prefill as TFLOP/s beside transformers")
    add_prefill_args(prefill)
    _add_engine_args(prefill)
    startup = bench_commands.add_parser("startup", help="time from process start to ready to serve")
    add_startup_args(startup)
    _add_engine_args(startup)
    precision = bench_commands.add_parser(
        "precision", help="quality of bf16, fp8, int4 and adaptive precision against float32"
    )
    add_precision_args(precision)
    spec = bench_commands.add_parser(
        "spec", help="speculative decoding: every fixed k and the adaptive policy over a load sweep"
    )
    add_spec_bench_args(spec)
    _add_engine_args(spec)
    kv = bench_commands.add_parser(
        "kv", help="KV-cache compression: quality and capacity per format, a load ramp with the policy"
    )
    add_kv_bench_args(kv)
    _add_engine_args(kv)
    plot = bench_commands.add_parser("plot", help="draw PNGs from benchmark JSON files")
    add_plot_args(plot)
    for parser in (serve, offline, decode, prefill, startup, precision, spec, kv, plot):
        parser.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    srv = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    srv.add_argument("model_path", nargs="?", default=None, help="model to serve; default: embedded SmolLM2")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--served-model-name", default=None, help="model name in the API; default: from the path"
    )
    srv.add_argument("--scheduling-policy", default="priority", choices=["priority", "fcfs"])
    srv.add_argument(
        "--admission",
        default="slo",
        choices=["slo", "off"],
        help="reject requests predicted to miss their SLO",
    )
    srv.add_argument(
        "--ttft-slo", default="", help="TTFT SLO per priority tier in seconds, e.g. high=0.5,normal=2,low=10"
    )
    srv.add_argument("--max-waiting-requests", type=int, default=1024)
    srv.add_argument("--max-waiting-tokens", type=int, default=1 << 20)
    srv.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM"
    )
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_engine_args(srv)
    srv.set_defaults(func=_serve)

    gen = commands.add_parser("generate", help="generate text for prompts, batched")
    gen.add_argument("prompt", nargs="*", help="prompt text (several allowed)")
    gen.add_argument("--prompts-file", help="a file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("-n", type=int, default=1)
    gen.add_argument("--json", action="store_true", help="one JSON line per completion")
    _add_engine_args(gen)
    gen.set_defaults(func=_generate)

    _add_bench_commands(commands)
    from adaptserve.sim.cli import add_sim_parser

    add_sim_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["adaptserve", *argv])  # what results files record as the command
    try:
        return args.func(args)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
