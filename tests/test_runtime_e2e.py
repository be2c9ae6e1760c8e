"""The runtime (edgeprune_runtime, ONNX Runtime) on exported tiny bundles vs transformers' own `generate`.

README "How it works": at budget 1.0 with newlines kept the bundle must reproduce `generate` token for
token, for any image; here also the logits of every step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_inputs import random_image
from edgeprune_runtime import Bundle

QUESTION = "What is in the picture?"
STEPS = 12


@pytest.mark.parametrize("hw", [(100, 100), (150, 230), (230, 90), (40, 60)])
def test_budget_1_reproduces_transformers_generate(tiny, tiny_bundles, hw):
    image = random_image(hw, seed=3)
    with Bundle(tiny_bundles[1.0]) as bundle:
        text = bundle.manifest["prompt_template"].replace("{prompt}", QUESTION)
        inputs = tiny.processor(images=image, text=text, return_tensors="pt")
        with torch.no_grad():
            out = tiny.model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
        expected = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        with bundle.generator(image, QUESTION, max_new_tokens=STEPS) as gen:
            for step in range(STEPS):
                gen.generate_next_token()
                np.testing.assert_allclose(gen.logits, out.logits[step][0].numpy(), atol=1e-4, rtol=0)
            assert list(gen.token_ids) == expected
            assert gen.visual_tokens + len(gen.prompt_token_ids) - 1 == inputs["input_ids"].shape[1]


def test_budget_0_2_sees_the_budgeted_visual_tokens(tiny_bundles):
    with Bundle(tiny_bundles[0.2]) as bundle:
        k = bundle.shapes.visual_topk
        result = bundle.generate(random_image((150, 230)), QUESTION, max_new_tokens=8)
    assert result.visual_tokens == k and result.stop_reason in ("eos", "max_new_tokens")
    assert len(result.token_ids) >= 1 and result.ttft_s > 0
