"""The authors' FastLoRA generators in genadapter: loading, and parity with an independent reference of their forward.

`Reference` re-implements, in plain tensor code on a HF Mistral, what the authors' code does (fastlora/model.py:
FastLoraLinear, FastLoraDecoderLayer, FastLoraModelForCausalLM.to_lora_weights; fastlora/eval_utils.py:
fastlora_generate_adaptor), reading the weights straight from the FastLoRA files: it never calls genadapter's generator.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TEXT_A, TEXT_B, make_adapter, make_tokenizer
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import MistralForCausalLM

from genadapter import ContextState, GenAdapterError, GenerativeAdapter, GeneratorConfig
from genadapter.config import OVERRIDABLE
from genadapter.testing import make_mistral

PROMPT = "Where is the tower? It is in"
WINDOW = 16
# (fastlora_inter_size R1, fastlora_r R2, fastlora_max_rank r): a truncating SVD as released (r < R1, R2), and a full
# one, where the authors' randomized torch.svd_lowrank is exact and the reference calls it as they do
SHAPES = {"truncated": (16, 12, 4), "full-rank": (12, 8, 8)}


def tiny_mistral(vocab_size: int) -> MistralForCausalLM:
    return make_mistral(vocab_size, initializer_range=0.1)


def fastlora_config(inter_size: int, r: int, max_rank: int, **changes) -> dict:
    """An adapter_config.json as the authors' FastLoraConfig (a PeftConfig) saves it."""
    config = {
        "peft_type": "FASTLORA",
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": "tiny-mistral",
        "revision": None,
        "inference_mode": True,
        "fastlora_r": r,
        "fastlora_inter_size": inter_size,
        "fastlora_window": WINDOW,
        "fastlora_max_rank": max_rank,
        "fastlora_attn_len": 8192,
        "fastlora_gist_len": 0,
        "fastlora_alpha": 16,
        "fastlora_dropout": 0.0,
        "fastlora_arch": "aassbb",
        "fastlora_norm": "svd",
        "fastlora_init": "copying",
        "fastlora_merge": "pre-norm-sum",
        "fastlora_param": ["o_proj"],
        "fastlora_training_attention_mask": "abcdabcd",
        "target_modules": ["o_proj"],
        "lora_r": 0,
        "lora_alpha": 0,
        "lora_dropout": 0.0,
        "lora_param": None,
        "layer_replication": None,
        "megatron_config": None,
        "bias": "none",
    }
    return config | changes


def write_fastlora(directory: Path, model: nn.Module, config: dict, weights_file: str = "adapter_model.safetensors"):
    """Random FastLoRA weights (non-zero B, γ ≠ 1) under the key names the authors' PEFT model saves."""
    rng = torch.Generator().manual_seed(1)
    d, r1, r2 = model.config.hidden_size, config["fastlora_inter_size"], config["fastlora_r"]
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config["target_modules"]:
            # their FastLoraDecoderLayer wraps each decoder layer: model.layers.0.base_layer.self_attn.o_proj
            prefix = "base_model.model." + re.sub(r"(layers\.\d+)\.", r"\1.base_layer.", name)
            d_in, d_out = module.in_features, module.out_features
            parts = {
                "A1": torch.randn(r1, d_in, generator=rng) / d_in**0.5,
                "A2": torch.randn(r1, d, generator=rng) / d**0.5,
                "A3": torch.randn(r2, d, generator=rng) / d**0.5,
                "B": torch.randn(d_out, r2, generator=rng),
                "hidden_state_norm": 1 + 0.2 * torch.randn(d, generator=rng),
            }
            tensors |= {f"{prefix}.fastlora_{part}.weight": value for part, value in parts.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if weights_file.endswith(".safetensors"):
        save_file(tensors, str(directory / weights_file))
    else:
        torch.save(tensors, directory / weights_file)


class Reference:
    """The authors' FastLoRA forward (their semantics, written anew), on a HF causal LM."""

    def __init__(self, model: nn.Module, directory: Path):
        config = json.loads((directory / "adapter_config.json").read_text())
        self.model, self.window, self.max_rank = model, config["fastlora_window"], config["fastlora_max_rank"]
        self.scaling = config["fastlora_alpha"] / config["fastlora_r"]  # FastLoraLinear.fastlora_scaling
        self.params: dict[str, dict[str, Tensor]] = {}
        for key, value in load_file(str(directory / "adapter_model.safetensors")).items():
            path, part = key.split(".fastlora_")
            name = path.removeprefix("base_model.model.").replace(".base_layer", "")
            self.params.setdefault(name, {})[part.removesuffix(".weight")] = value
        self.layer = {name: int(re.search(r"layers\.(\d+)\.", name).group(1)) for name in self.params}
        self.modules = dict(model.named_modules())

    def kv_states(self, hidden: Tensor, mask: Tensor, name: str) -> Tensor:
        """_kv_mapping_matrix before the merge: per segment Σ_t K_tᵀ V_t (S, R1, R2); hidden (S, L, d) enters the
        layer; RMSNorm (eps 1e-6) with weight γ; keys and values of padding masked to zero."""
        p = self.params[name]
        h = hidden.float()
        h = p["hidden_state_norm"] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        keys = (h @ p["A2"].T) * mask.unsqueeze(-1)
        values = (h @ p["A3"].T) * mask.unsqueeze(-1)
        return keys.transpose(-1, -2) @ values

    def svd_norm(self, M: Tensor) -> Tensor:
        """_svd_norm: U Vᵀ of torch.svd_lowrank(M, q=max_rank, niter=1), singular values dropped. That randomized SVD
        is exact when q = min(R1, R2); with q smaller it approximates the exact top-q factor, which genadapter
        computes, so the reference takes that."""
        if self.max_rank >= min(M.shape[-2:]):
            U, _, V = torch.svd_lowrank(M.float(), q=self.max_rank, niter=1)
            return U @ V.mT
        U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
        return (U[..., : self.max_rank] @ Vh[..., : self.max_rank, :]).float()

    def windows(self, ids: list[int]) -> tuple[Tensor, Tensor]:
        """fastlora_generate_adaptor: ceil(n / window) windows of equal length, the last padded (S, L)."""
        count = math.ceil(len(ids) / self.window)
        length = math.ceil(len(ids) / count)
        padded = torch.tensor(ids + [0] * (count * length - len(ids)))
        mask = (torch.arange(count * length) < len(ids)).long()
        return padded.view(count, length), mask.view(count, length)

    def hooked(self, hook_for) -> list:
        return [self.modules[name].register_forward_hook(hook_for(name)) for name in self.params]

    def absorb(self, ids: list[int], strategy: str) -> dict[str, Tensor]:
        """The merged state Σ_segments (pre-norm-sum) per module of a context, as to_lora_weights sums it after the
        context forward of the merge strategy: 'parallel' (segments encoded alone by the frozen LM) or 'sequential'
        (one forward of all segments in the 'default' mode: in every adapted module, segment i gets the normalised
        sum of segments < i of that layer's input hidden states, computed in the same forward; segment 0 none)."""
        segments, mask = self.windows(ids)
        layer_inputs: dict[int, Tensor] = {}

        def capture(layer: int):
            def pre_hook(module, args, kwargs):  # FastLoraDecoderLayer: the hidden states entering the layer
                layer_inputs[layer] = args[0] if args else kwargs["hidden_states"]

            return pre_hook

        def adapt(name: str):
            def hook(module, args, output):
                per_segment = self.kv_states(layer_inputs[self.layer[name]], mask, name)
                before = per_segment.cumsum(0) - per_segment  # Σ_{j<i}: the causal merge, diagonal=-1
                ss = torch.cat([torch.zeros_like(before[:1]), self.svd_norm(before[1:])])
                p = self.params[name]
                return output + self.scaling * ((args[0] @ p["A1"].T) @ ss) @ p["B"].T

            return hook

        handles = [
            layer.register_forward_pre_hook(capture(i), with_kwargs=True)
            for i, layer in enumerate(self.model.model.layers)
        ]
        if strategy == "sequential":
            handles += self.hooked(adapt)
        try:
            with torch.no_grad():
                hidden = self.model(input_ids=segments, attention_mask=mask, output_hidden_states=True).hidden_states
        finally:
            for handle in handles:
                handle.remove()
        return {name: self.kv_states(hidden[self.layer[name]], mask, name).sum(0) for name in self.params}

    def logits(self, ids: Tensor, mask: Tensor, state: dict[str, Tensor] | None) -> Tensor:
        """The 'weights' mode: base output + scaling · x lora_aᵀ lora_bᵀ, lora_a = ssᵀ A1, lora_b = B."""

        def adapt(name: str):
            p = self.params[name]
            lora_a, lora_b = self.svd_norm(state[name]).T @ p["A1"], p["B"]
            return lambda module, args, output: output + self.scaling * (args[0] @ lora_a.T) @ lora_b.T

        handles = self.hooked(adapt) if state is not None else []
        try:
            with torch.no_grad():
                return self.model(input_ids=ids, attention_mask=mask).logits
        finally:
            for handle in handles:
                handle.remove()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tiny-mistral")
    tokenizer = make_tokenizer()
    tiny_mistral(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def load(base: Path, directory: Path, **overrides) -> GenerativeAdapter:
    return GenerativeAdapter.from_pretrained(base=str(base), generator=directory, overrides=overrides or None)


@pytest.fixture(scope="module", params=list(SHAPES))
def fastlora(request, base_dir, tmp_path_factory) -> tuple[Path, Reference]:
    directory = tmp_path_factory.mktemp(f"fastlora-{request.param}")
    write_fastlora(directory, MistralForCausalLM.from_pretrained(base_dir), fastlora_config(*SHAPES[request.param]))
    return directory, Reference(MistralForCausalLM.from_pretrained(base_dir).eval(), directory)


def context_ids(ga: GenerativeAdapter, windows: int) -> list[int]:
    """The context as the authors feed it: tokenized with BOS, `windows` windows long."""
    ids = ga.tokenizer(TEXT_A + TEXT_B, add_special_tokens=False)["input_ids"][: windows * WINDOW - 8]
    return [ga.tokenizer.bos_token_id, *ids]


@pytest.mark.parametrize(
    ("mode", "strategy", "windows"),
    [
        ("sequential", "sequential", 1),
        ("sequential", "sequential", 3),
        ("independent", "parallel", 1),
        ("independent", "parallel", 3),
    ],
)
def test_loaded_generator_gives_the_authors_logits(base_dir, fastlora, mode, strategy, windows):
    directory, reference = fastlora
    ga = load(base_dir, directory, chunk_mode=mode)
    assert ga.config.chunk_mode == mode and ga.config.scale == 16 / ga.config.value_dim
    ids = context_ids(ga, windows)
    assert len(ga.chunk([ids[1:]])) == windows  # genadapter adds the BOS itself (context_bos)
    state = ga.absorb(ids[1:])
    assert state.num_tokens == len(ids)
    expected = reference.absorb(ids, strategy)
    for name, total in expected.items():
        torch.testing.assert_close(state.sums[name], total, rtol=1e-4, atol=1e-4)

    prompt, mask = ga.pad([ga.tokenizer(PROMPT)["input_ids"]])
    ours, theirs = ga.logits(prompt, mask, state=state), reference.logits(prompt, mask, expected)
    assert (ours - ga.logits(prompt, mask)).abs().max() > 1e-2  # the adapter matters
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_sequential_and_independent_differ_beyond_one_window(base_dir, fastlora):
    directory, reference = fastlora
    ga = load(base_dir, directory)
    ids = context_ids(ga, 3)
    sequential, parallel = reference.absorb(ids, "sequential"), reference.absorb(ids, "parallel")
    first, second = "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"
    assert torch.equal(sequential[first], parallel[first])  # layer 0 reads the embeddings, which no adapter changes
    assert (sequential[second] - parallel[second]).abs().max() > 1e-2  # the test can tell the modes apart
    sequential, parallel = (reference.absorb(context_ids(ga, 1), strategy) for strategy in ("sequential", "parallel"))
    assert all(torch.equal(sequential[k], parallel[k]) for k in sequential)


def test_config_mapping_and_defaults(base_dir, fastlora):
    directory, _ = fastlora
    ga = load(base_dir, directory)
    inter, r, max_rank = ga.config.key_dim, ga.config.value_dim, ga.config.rank
    assert (inter, r, max_rank) in SHAPES.values()
    assert ga.config.target_modules == ["o_proj"] and ga.config.chunk_size == WINDOW and ga.config.alpha == 16.0
    assert (ga.config.chunk_mode, ga.config.chunk_split, ga.config.context_bos) == ("sequential", "even", True)
    assert ga.config.base_model == "tiny-mistral" and ga.config.norm_eps == 1e-6
    assert {"chunk_mode", "chunk_split", "context_bos"} <= set(OVERRIDABLE)
    assert load(base_dir, directory, chunk_mode="independent").fingerprint != ga.fingerprint


def test_weights_from_adapter_model_bin(base_dir, fastlora, tmp_path):
    directory, _ = fastlora
    config = json.loads((directory / "adapter_config.json").read_text())
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps(config))
    torch.save(load_file(str(directory / "adapter_model.safetensors")), tmp_path / "bin" / "adapter_model.bin")
    assert load(base_dir, tmp_path / "bin").fingerprint == load(base_dir, directory).fingerprint


def test_even_windows_and_bos():
    """chunk_split 'even' cuts as the authors do (their windows: ceil(n / w) of ceil(n / that) tokens)."""
    ga = make_adapter(chunk_size=16, chunk_split="even", context_bos=True)
    bos = ga.tokenizer.bos_token_id
    for n in (1, 15, 16, 17, 40, 47, 48, 49, 100):
        chunks = ga.chunk([list(range(1000, 1000 + n - 1))])  # n tokens with the BOS
        count = math.ceil(n / 16)
        size = math.ceil(n / count)
        assert [len(c) for c in chunks] == [size] * (count - 1) + [n - (count - 1) * size]
        assert chunks[0][0] == bos and sum(c.count(bos) for c in chunks) == 1
    fixed = make_adapter(chunk_size=16)
    assert [len(c) for c in fixed.chunk([list(range(40))])] == [16, 16, 8]


def test_sequential_states_refuse_addition_and_subtraction(base_dir, fastlora, tmp_path):
    directory, _ = fastlora
    ga = load(base_dir, directory)
    a, b = ga.absorb(TEXT_A), ga.absorb(TEXT_B)
    b.save(tmp_path / "b.safetensors")
    b = ContextState.load(tmp_path / "b.safetensors")  # the mode travels with the state
    assert b.chunk_mode == "sequential"
    with pytest.raises(GenAdapterError, match="exact only in chunk_mode 'independent'"):
        a + b  # noqa: B018
    with pytest.raises(GenAdapterError, match="cannot be added or subtracted"):
        a - b  # noqa: B018
    independent = load(base_dir, directory, chunk_mode="independent")
    together = independent.absorb([TEXT_A, TEXT_B])
    assert together.allclose(independent.absorb(TEXT_A) + independent.absorb(TEXT_B), atol=1e-4)


def test_sequential_absorbs_a_long_context_chunk_by_chunk(base_dir, fastlora):
    """Any length: one chunk per forward, each with the adapter of the running state; batch_size does not matter."""
    directory, _ = fastlora
    ga = load(base_dir, directory)
    text = (TEXT_A + TEXT_B) * 4
    state = ga.absorb(text, batch_size=3)
    assert state.num_tokens == len(ga.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    assert len(ga.chunk(ga.tokenize_context(text))) > 20
    assert state.allclose(ga.absorb(text, batch_size=64))


def test_peft_export_gives_identical_logits(base_dir, fastlora, tmp_path):
    directory, _ = fastlora
    ga = load(base_dir, directory)
    state = ga.absorb(TEXT_A)
    ga.export_peft(state, tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ga.model), tmp_path / "lora").eval()
    ids, mask = ga.pad([ga.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    ours = ga.logits(ids, mask, state=state)
    assert (ours - ga.logits(ids, mask)).abs().max() > 1e-2
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_per_row_states_equal_one_at_a_time(base_dir, fastlora):
    directory, _ = fastlora
    ga = load(base_dir, directory)
    a, b = ga.absorb(TEXT_A), ga.absorb(TEXT_B)
    prompts, states = ["Where is the tower?", "Who won?", "Hi"], [a, b, None]
    batched = ga.generate(prompts, state=states, max_new_tokens=6)
    assert batched == [ga.generate(p, state=s, max_new_tokens=6) for p, s in zip(prompts, states, strict=True)]

    encoded = [ga.tokenizer(p)["input_ids"] for p in prompts]
    ids, mask = ga.pad(encoded)
    together = ga.logits(ids, mask, state=states)
    for row, (seq, state) in enumerate(zip(encoded, states, strict=True)):
        alone = ga.logits(*ga.pad([seq]), state=state)[0]
        torch.testing.assert_close(together[row, : len(seq)], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fastlora_arch": "aasb"}, "fastlora_arch = 'aasb' is not supported"),
        ({"fastlora_norm": "frobenius"}, "fastlora_norm = 'frobenius' is not supported"),
        ({"fastlora_norm": "softmax"}, "fastlora_norm = 'softmax' is not supported"),
        ({"fastlora_merge": "mean"}, "fastlora_merge = 'mean' is not supported"),
        ({"fastlora_new_trick": 1}, "unknown FastLoRA settings"),
        ({"lora_r": 8}, "plain LoRA beside FastLoRA"),
        ({"peft_type": "LORA"}, "not a generator"),
        ({"fastlora_max_rank": 64}, "rank 64 exceeds"),
    ],
)
def test_unsupported_settings_are_refused_clearly(base_dir, fastlora, tmp_path, changes, message):
    directory, _ = fastlora
    config = json.loads((directory / "adapter_config.json").read_text()) | changes
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes((directory / "adapter_model.safetensors").read_bytes())
    with pytest.raises(GenAdapterError, match=re.escape(message)):
        load(base_dir, tmp_path)


def test_weights_that_do_not_fit_are_refused(base_dir, fastlora, tmp_path):
    directory, _ = fastlora
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text((directory / "adapter_config.json").read_text())
    missing = {k: v for k, v in tensors.items() if "layers.1." not in k or "fastlora_B" not in k}
    save_file(missing, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(GenAdapterError, match="lacks 1 FastLoRA weights"):
        load(base_dir, tmp_path)
    wrong = {k: v[:, :-1].contiguous() if "fastlora_A1" in k else v for k, v in tensors.items()}
    save_file(wrong, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(GenAdapterError, match="has shape"):
        load(base_dir, tmp_path)


def test_chunk_mode_stays_out_of_release_fingerprints():
    """The new fields hold their defaults in every generator shipped so far: left out of fingerprints."""
    config = GeneratorConfig()
    assert not {"chunk_mode", "chunk_split", "context_bos"} & set(config.identity())
    assert replace(config, chunk_mode="sequential").identity()["chunk_mode"] == "sequential"
    with pytest.raises(GenAdapterError, match="chunk_mode"):
        GeneratorConfig(chunk_mode="parallel")


@pytest.mark.integration
def test_shipped_smollm2_generator_keeps_its_fingerprint():
    ga = GenerativeAdapter.from_pretrained()
    assert ga.config.chunk_mode == "independent" and not ga.config.context_bos
    assert ga.fingerprint == "5b91070a00fd5e8a"


def test_training_refuses_a_sequential_generator_and_trains_it_when_told_independent(base_dir, fastlora, tmp_path):
    """Training encodes chunks independently: a sequential generator is refused, not silently trained otherwise."""
    from genadapter.train import TrainConfig
    from genadapter.train.loop import TrainingError, build_adapter

    directory, _ = fastlora
    config = TrainConfig(base=str(base_dir), init_generator=str(directory), output_dir=str(tmp_path / "run"))
    with pytest.raises(TrainingError, match="chunk_mode"):
        build_adapter(config, torch.device("cpu"))
    config.generator_overrides = {"chunk_mode": "independent"}
    assert build_adapter(config, torch.device("cpu")).config.chunk_mode == "independent"
