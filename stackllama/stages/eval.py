"""Stage 'eval': not implemented yet."""


def run(cfg, ctx):
    raise NotImplementedError("stage=eval is not implemented yet")
