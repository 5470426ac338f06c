"""Merging a LoRA adapter into base weights (llm2llm_jobs.lora): the arithmetic, the names, and the adapters it
refuses. The real engine swap (vLLM reload_weights) is tested against HF in tests/integration/test_infer.py."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from llm2llm_jobs.lora import MergedAdapter, merged_weights  # noqa: E402

Q = "model.layers.0.self_attn.q_proj.weight"
EMB = "model.embed_tokens.weight"


def _base(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    w = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    save_file({Q: w.to(torch.bfloat16), EMB: torch.ones(3, 4)}, str(d / "model.safetensors"))
    return d, w


def _adapter(tmp_path, r=2, alpha=4, name=Q, **config):
    d = tmp_path / f"adapter-{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    a, b = torch.full((r, 4), 0.5), torch.full((4, r), 0.25)
    stem = "base_model.model." + name.removesuffix(".weight")
    save_file({f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, **config}))
    return d, a, b


def test_the_adapter_is_added_to_its_layer_and_the_rest_is_the_base_model(tmp_path):
    base, w = _base(tmp_path)
    adapter, a, b = _adapter(tmp_path)
    got = dict(merged_weights(str(base), str(adapter)))
    assert set(got) == {Q, EMB}
    assert torch.equal(got[Q], w + (b @ a) * 2.0)  # alpha / r
    assert torch.equal(got[EMB], torch.ones(3, 4))
    assert dict(merged_weights(str(base), None))[Q].dtype == torch.bfloat16  # no adapter: the checkpoint as is


def test_rank_stabilised_scaling(tmp_path):
    base, w = _base(tmp_path)
    adapter, a, b = _adapter(tmp_path, r=4, alpha=4, use_rslora=True)
    assert torch.allclose(dict(merged_weights(str(base), str(adapter)))[Q], w + (b @ a) * 2.0)  # alpha / sqrt(r)


@pytest.mark.parametrize("config", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"bias": "all"},
                                    {"rank_pattern": {"q_proj": 4}}])
def test_an_adapter_a_merge_would_get_wrong_is_refused_by_name(tmp_path, config):
    base, _ = _base(tmp_path)
    adapter, _, _ = _adapter(tmp_path, **config)
    field = next(iter(config))
    with pytest.raises(ValueError, match=f"adapter_config.json: {field}="):
        list(merged_weights(str(base), str(adapter)))


def test_an_adapter_for_another_model_is_refused(tmp_path):
    base, _ = _base(tmp_path)
    adapter, _, _ = _adapter(tmp_path, name="model.layers.9.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match="match no weight"):
        list(merged_weights(str(base), str(adapter)))


class _Engine:
    """What MergedAdapter asks of a vLLM LLM: reload_weights and reset_prefix_cache."""

    def __init__(self, fail: bool = False):
        self.loads: list[dict] = []
        self.resets = 0
        self.fail = fail

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        if self.fail:
            raise RuntimeError("reload failed")
        self.loads.append(dict(kwargs["weights_iterator"]))

    def reset_prefix_cache(self):
        self.resets += 1


def test_the_engine_reloads_only_on_a_change_and_forgets_cached_prefixes(tmp_path):
    base, w = _base(tmp_path)
    first, a, b = _adapter(tmp_path)
    second, _, _ = _adapter(tmp_path, alpha=8)
    engine = _Engine()
    merged = MergedAdapter(engine, str(base))
    merged.use(None)  # already the base model: nothing to do
    merged.use(str(first), key="s3://runs/iter-0/model")
    merged.use(str(first), key="s3://runs/iter-0/model")
    merged.use(str(second))
    merged.use(None)
    assert len(engine.loads) == engine.resets == 3
    assert torch.equal(engine.loads[0][Q], w + (b @ a) * 2.0) and torch.equal(engine.loads[1][Q], w + (b @ a) * 4.0)
    assert torch.equal(engine.loads[2][Q].float(), w)


def test_a_failed_reload_is_never_taken_for_the_adapter_it_was_loading(tmp_path):
    base, _ = _base(tmp_path)
    adapter, _, _ = _adapter(tmp_path)
    engine = _Engine(fail=True)
    merged = MergedAdapter(engine, str(base))
    with pytest.raises(RuntimeError):
        merged.use(str(adapter))
    engine.fail = False
    merged.use(None)  # not "already the base model": the weights are unknown, so they are reloaded
    assert len(engine.loads) == 1
