"""Weight inheritance through the renumbering: key mapping, fresh layers, mismatched checkpoints."""

from __future__ import annotations

import pytest
import torch

from space import Placement, SpaceError, build_model, load_base, make_candidate
from space.inherit import check_checkpoint, inherit
from test_space import TINY


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.yaml"
    path.write_text(TINY)
    return load_base(path, scale="n")


def trained_state(candidate, seed=0) -> dict[str, torch.Tensor]:
    """A base 'checkpoint': every tensor random, so a copied tensor is recognisable."""
    torch.manual_seed(seed)
    model = build_model(candidate).model
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if key.endswith("running_var") else torch.randn_like(t))
    return model.state_dict()


def test_keys_follow_the_renumbering(tiny):
    base_state = trained_state(make_candidate(tiny))
    cand = make_candidate(tiny, {"P3": Placement("P3", "CGA"), "P4": Placement("P4", "STA", "replace"),
                                 "N3": Placement("N3", "CoT")})
    # base 0..9 -> 0,1,2,3 | CGA 4 | 4->5 | STA replaces 5 at 6 | 6->7, 7->8, 8->9 | CoT 10 | 9->11
    assert dict(cand.base_layers) == {0: 0, 1: 1, 2: 2, 3: 3, 4: 5, 6: 7, 7: 8, 8: 9, 9: 11}
    model = build_model(cand).model
    fresh_before = {k: v.clone() for k, v in model.state_dict().items()}
    report = inherit(model, cand.base_layers, base_state)
    state = model.state_dict()
    for old, new in cand.base_layers:
        for key, value in base_state.items():
            if key.startswith(f"model.{old}."):
                assert torch.equal(state[key.replace(f"model.{old}.", f"model.{new}.", 1)], value), key
    for layer in (4, 6, 10):  # inserted CGA, replacing STA, inserted CoT
        keys = [k for k in state if k.startswith(f"model.{layer}.")]
        assert keys and all(torch.equal(state[k], fresh_before[k]) for k in keys)
    assert report.fresh_layers == (4, 6, 10)
    expected = [v for k, v in base_state.items() if not k.startswith("model.5.")]
    assert report.tensors == len(expected)
    params = {n for n, _ in model.named_parameters()}
    assert report.params == sum(state[k].numel() for k in state if k in params and not k.startswith(("model.4.", "model.6.", "model.10.")))


def test_identity_start_keeps_the_inherited_network(tiny):
    """CGA starts as an exact identity, so an inherited candidate computes exactly what the base computes."""
    base_cand = make_candidate(tiny)
    base_model = build_model(base_cand).model
    base_model.load_state_dict(trained_state(base_cand))
    cand = make_candidate(tiny, {"P3": Placement("P3", "CGA"), "N3": Placement("N3", "CGA")})
    model = build_model(cand).model
    inherit(model, cand.base_layers, base_model.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[0], base_model.eval()(x)[0])


def test_checkpoint_of_another_scale_is_refused(tiny):
    reference = build_model(make_candidate(tiny)).model.state_dict()
    other = build_model(make_candidate(load_base(tiny.name, scale="s"))).model.state_dict()
    with pytest.raises(SpaceError, match="another base or scale"):
        check_checkpoint(other, reference, "ckpt.pt")


def test_checkpoint_of_another_base_is_refused(tiny):
    reference = build_model(make_candidate(tiny)).model.state_dict()
    other = build_model(make_candidate(load_base("yolov8n.yaml"))).model.state_dict()
    with pytest.raises(SpaceError, match="does not match the base"):
        check_checkpoint(other, reference, "ckpt.pt")


def test_other_class_count_skips_only_the_class_branch(tiny):
    base = make_candidate(tiny)
    reference = build_model(base).model.state_dict()  # nc 2
    data80 = {**base.yaml, "nc": 80}
    ckpt = build_model(type(base)(base.base, base.scale, data80, (), base.hash, base.base_layers)).model.state_dict()
    skipped = check_checkpoint(ckpt, reference, "ckpt.pt")
    assert skipped and all(".cv3." in k for k in skipped)
    cand = make_candidate(tiny, {"N3": Placement("N3", "GMA")})
    model = build_model(cand).model
    report = inherit(model, cand.base_layers, ckpt, skip=skipped)
    assert report.skipped_head_keys == skipped and report.tensors == len(ckpt) - len(skipped)
