"""The tuner: a safe online bandit and a gymnasium Env over the same knob settings.

Modules import on their own (`space`, `reward`, `bandit`, `policy` need only numpy; `env` needs gymnasium
and the simulator), so nothing heavy is imported here.
"""
