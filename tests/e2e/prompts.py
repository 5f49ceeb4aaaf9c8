"""Varied prompts for parity tests: raw and chat, short and long (the long ones are > 600 tokens)."""

LONG_STORY = """The harbour town of Kelmscott sits where two rivers meet the sea, and for most of its history
it was known for three things: salted herring, stubborn weather, and a lighthouse that never seemed to be
finished.
The first keeper, a retired sailor named Agnes Morrow, arrived in the spring of 1821 with a crate of lamp oil,
a dog with one ear, and a contract that promised her a stone tower within the year. The tower took eleven
years. During that time Agnes kept a fire burning on a wooden platform at the end of the pier, and the
fishermen said that her fire was more reliable than any lens the engineers later installed.
When the tower was finally completed, the town held a festival that lasted four days. There were rowing
races across the estuary, a competition for the largest cabbage, and a debate in the chapel about whether
the new light should flash or burn steadily. The steady-light faction won by six votes, but the engineers
ignored the result and installed a rotating lens anyway, because the Admiralty had already paid for it.
The nineteenth century brought the railway, which changed the town more than the lighthouse ever had.
Fish could now reach the cities inside a day, and the harbour filled with boats from ports hundreds of miles
away. The population doubled, then doubled again. New streets were laid out in a grid that ignored the old
footpaths, so that for decades visitors complained that the shortest way between any two points was a
staircase that did not appear on any map. The town council responded by printing a new map every spring,
each one slightly less accurate than the last.
In the twentieth century the herring disappeared. Nobody agreed on why: some blamed the trawlers from the
north, some blamed the warmer water, and a few old men insisted that the fish had simply grown tired of
Kelmscott. The smokehouses closed one by one. The railway station became a museum, then a cafe, then a
museum again. The lighthouse was automated in 1974, and the last keeper, a quiet man who had spent
thirty years counting ships, moved into a cottage on the hill from which he could still see the beam.
Today the town lives on visitors who come for the cliffs, the birds, and the annual festival, which still
includes a cabbage competition. Every year someone proposes that the lighthouse should burn steadily, as
the town voted in 1832, and every year the proposal is politely recorded in the minutes and forgotten.
Historians who study the town point out that its story is typical of many small harbours: a long period of
slow growth, a sudden boom when transport improved, and a gradual decline when the industry that sustained
it vanished. What makes Kelmscott unusual is how carefully its people kept records. The council minutes,
the harbour logs, and the keepers' diaries survive almost complete, so that it is possible to know, for
almost any day in the last two centuries, what the weather was, which boats came in, and what the town
argued about that evening."""

CODE = '''def merge_intervals(intervals):
    """Merge overlapping closed intervals given as (start, end) pairs."""
    if not intervals:
        return []
    intervals = sorted(intervals)
    merged = [list(intervals[0])]
    for start, end in intervals[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(pair) for pair in merged]
'''

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    LONG_STORY + "\n\nIn one sentence, the main reason the town declined was",
]

CHAT_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in at most two sentences."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Explain what this function does and give an example call.\n\n" + CODE}],
    [{"role": "user", "content": LONG_STORY + "\n\nSummarise this story in three bullet points."}],
]
