"""Stage 'rm': not implemented yet."""


def run(cfg, ctx):
    raise NotImplementedError("stage=rm is not implemented yet")
