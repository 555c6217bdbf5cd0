"""Stage 'sft': not implemented yet."""


def run(cfg, ctx):
    raise NotImplementedError("stage=sft is not implemented yet")
