"""training.kernel_analysis: beta, its entropy, contributions and binding with kernel families switched off."""

import math

import torch

from mklvisita import MKLVisITA, MKLVisITAConfig
from mklvisita.inputs import Processor
from training.kernel_analysis import analyse, kernels_off


def test_kernel_analysis_reports_and_restores():
    torch.manual_seed(0)
    model = MKLVisITA(MKLVisITAConfig.tiny())
    with torch.no_grad():
        model.kernels.logits.copy_(torch.randn(model.kernels.num_kernels))
    before = model.kernels.logits.detach().clone()
    with kernels_off(model, [0, 1]):
        beta = model.kernel_weights()
        assert float(beta[:2].sum()) < 1e-6 and abs(float(beta.sum()) - 1) < 1e-5  # renormalised over the rest
    assert torch.equal(model.kernels.logits.detach(), before)  # restored
    res = analyse(model, Processor(model.config, model.tokenizer), limit=3)
    assert res["pairs"] == 15 and res["log_M"] == round(math.log(len(model.kernel_names)), 4)
    assert 0 < res["beta_entropy"] <= res["log_M"]
    assert abs(sum(res["beta"].values()) - 1) < 1e-3
    assert set(res["binding_all_kernels"]) == {"sim", "itm", "final"}
    assert {"source:local", "function:rbf"} <= set(res["binding_family_off"])
    assert torch.equal(model.kernels.logits.detach(), before)
