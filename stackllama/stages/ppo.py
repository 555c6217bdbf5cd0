"""Stage 'ppo': not implemented yet."""


def run(cfg, ctx):
    raise NotImplementedError("stage=ppo is not implemented yet")
