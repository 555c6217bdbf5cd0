"""Stage 'all': not implemented yet."""


def run(cfg, ctx):
    raise NotImplementedError("stage=all is not implemented yet")
