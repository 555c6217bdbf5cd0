"""Generation's few-row products in the weight-major layout: the same logits and samples."""

import torch

from stackllama.models.decode_matmul import DECODE_ROWS, weight_major_decode
from tests.conftest import compose_cfg


def test_weight_major_decode_gives_the_same_logits_and_generation_and_is_undone():
    """Generation's few-row products as (W x^T)^T: the same logits and samples, the layers restored after."""
    from transformers import AutoModelForCausalLM

    from stackllama.models.loader import model_folder

    model = AutoModelForCausalLM.from_pretrained(str(model_folder(compose_cfg(["model=tiny"]).model))).eval()
    head = model.get_output_embeddings()
    x = torch.randn(8, 1, head.in_features)
    ids = torch.randint(3, model.config.vocab_size, (2, 5))

    def sample():
        torch.manual_seed(0)
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=6)

    plain = sample()
    with torch.no_grad(), weight_major_decode(model):
        assert "forward" in vars(head), "the head was not switched to the weight-major product"
        assert "forward" in vars(model.model.layers[0].mlp.up_proj), "nor the decoder's projections"
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-5)
        long_rows = torch.randn(DECODE_ROWS + 1, head.in_features)  # many rows: F.linear as before
        torch.testing.assert_close(head(long_rows), torch.nn.functional.linear(long_rows, head.weight))
        switched = sample()
    assert not [m for m in model.modules() if "forward" in vars(m)]
    assert torch.equal(plain, switched)
