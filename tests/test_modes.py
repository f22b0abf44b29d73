"""Fine-tuning modes (full, FTLO, FTTS, LoRA) on a tiny CLIP classifier and a tiny T5, through SAFTTrainer."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from saft_hf import SAFTConfig, SAFTTrainer
from saft_hf.models import CLIPVisionClassifier, build_zero_shot_head
from saft_hf.modes import (
    LinearizedModel,
    apply_finetune_mode,
    load_linearized,
    saved_finetune_mode,
)
from saft_hf.testing import build_tiny_clip, build_tiny_t5, save_tiny_clip

CLASS_NAMES = ["zero", "one", "two"]
KINDS = ["clip", "t5"]
MODES = ["full", "ftlo", "ftts", "lora"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Ops on these tiny tensors take microseconds; a second intra-op thread only adds waiting on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained():
    clip, tokenizer, _ = build_tiny_clip(seed=0)
    head = build_zero_shot_head(clip, CLASS_NAMES, ["a photo of the number {}.", "a {} digit."], tokenizer)
    t5, _ = build_tiny_t5(seed=0)
    return {"clip": (clip.vision_model, head), "t5": t5}


def _unwrapped(model):
    """The model an FTTS wrapper linearises (its inputs are that model's), else the model itself."""
    return model.model if isinstance(model, LinearizedModel) else model


def _trainable_names(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def make_model(pretrained, kind):
    """A fresh copy of the pre-trained tiny model of `kind` (own weights and config, in train mode)."""
    if kind == "clip":
        vision_model, head = pretrained["clip"]
        vision_model = copy.deepcopy(vision_model)
        return CLIPVisionClassifier(vision_model.config, head, vision_model).train()
    return copy.deepcopy(pretrained["t5"]).train()


def make_inputs(kind, model, batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if kind == "clip":
        return {
            "pixel_values": torch.randn(batch, 3, 32, 32, generator=generator),
            "labels": torch.randint(0, len(CLASS_NAMES), (batch,), generator=generator),
        }
    vocab = model.config.vocab_size
    labels = torch.randint(3, vocab, (batch, 3), generator=generator)
    labels[:, -1] = model.config.eos_token_id
    labels[0, -1] = -100  # padding, ignored by the loss
    return {
        "input_ids": torch.randint(3, vocab, (batch, 6), generator=generator),
        "attention_mask": torch.ones(batch, 6, dtype=torch.long),
        "labels": labels,
    }


def make_dataset(kind, model, rows=8):
    columns = {name: tensor.tolist() for name, tensor in make_inputs(kind, model, batch=rows, seed=1).items()}
    # A column no model takes: the Trainer drops it by the forward signature, which must keep the real inputs.
    columns["idx"] = list(range(rows))
    return Dataset.from_dict(columns).with_format("torch")


def train(model, kind, tmp_path, sam_mode="asam", steps=2, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-2,
        sam_mode=sam_mode,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    args = SAFTConfig(**{**settings, **overrides})
    dataset = make_dataset(kind, _unwrapped(model))
    trainer = SAFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    return trainer


def snapshot(model):
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


# Independent statements of what each mode trains, with the count they must match on the tiny models
# (CLIP: 2 layers; T5: 2 encoder blocks with self-attention, 2 decoder blocks with self- and cross-attention).
EXPECTED_TRAINABLE = {
    ("clip", "ftlo"): (r"vision_model\.encoder\.layers\.\d\.self_attn\.(q|k|v|out)_proj\.(weight|bias)", 2 * 4 * 2),
    ("t5", "ftlo"): (
        r"(encoder|decoder)\.block\.\d\.layer\.\d\.(SelfAttention|EncDecAttention)\.(q|k|v|o)\.weight",
        6 * 4,
    ),
    ("clip", "lora"): (
        r"base_model\.model\.vision_model\.encoder\.layers\.\d\.self_attn\.(q|v)_proj\.lora_(A|B)\.default\.weight",
        2 * 2 * 2,
    ),
    ("t5", "lora"): (
        r"base_model\.model\.(encoder|decoder)\.block\.\d\.layer\.\d\.(SelfAttention|EncDecAttention)\.(q|v)"
        r"\.lora_(A|B)\.default\.weight",
        6 * 2 * 2,
    ),
}


def expected_trainable(kind, mode, base_names, wrapped):
    if mode == "full":
        return set(base_names)
    if mode == "ftts":
        return {f"model.{name}" for name in base_names}
    pattern, count = EXPECTED_TRAINABLE[kind, mode]
    names = {name for name, _ in wrapped.named_parameters() if re.fullmatch(pattern, name)}
    assert len(names) == count
    return names


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_trainable_parameters_are_exactly_the_modes(pretrained, kind, mode):
    model = make_model(pretrained, kind)
    base_names = [name for name, _ in model.named_parameters()]
    wrapped = apply_finetune_mode(model, mode)
    assert set(_trainable_names(wrapped)) == expected_trainable(kind, mode, base_names, wrapped)


@pytest.mark.parametrize(
    "kind, mode, sam_mode",
    [(kind, mode, "asam") for kind in KINDS for mode in MODES] + [("clip", mode, "none") for mode in MODES],
)
def test_training_changes_exactly_the_trainable_parameters(pretrained, tmp_path, kind, mode, sam_mode):
    wrapped = apply_finetune_mode(make_model(pretrained, kind), mode)
    trainable = set(_trainable_names(wrapped))
    before = snapshot(wrapped)
    trainer = train(wrapped, kind, tmp_path, sam_mode=sam_mode)
    after = snapshot(wrapped)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trainable
    if sam_mode == "asam":
        logged = [log for log in trainer.state.log_history if "sam/perturbation_norm" in log]
        assert logged and logged[0]["sam/perturbation_norm"] > 0


def _model_kwargs(model, inputs):
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
    return kwargs


def _taylor_reference(model, inputs, base, delta, seed):
    """`f(w0) + J(w0) d` by reverse-mode autograd (`torch.autograd.functional.jvp`, the double-backward trick),
    with the model's own forward and the dropout masks drawn from `seed`."""
    names = list(base)
    kwargs = _model_kwargs(model, inputs)

    def logits(*weights):
        return functional_call(model, dict(zip(names, weights)), args=(), kwargs=kwargs).logits

    torch.manual_seed(seed)
    # The attention kernel the linearised forward uses, so dropout draws the same masks.
    with sdpa_kernel(SDPBackend.MATH):
        value, tangent = torch.autograd.functional.jvp(logits, tuple(base.values()), tuple(delta[n] for n in names))
    return value + tangent


def _plain_logits(model, inputs, weights, seed):
    torch.manual_seed(seed)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return functional_call(model, weights, args=(), kwargs=_model_kwargs(model, inputs)).logits


@pytest.mark.parametrize("kind", KINDS)
def test_ftts_is_the_first_order_taylor_expansion(pretrained, kind):
    # Train mode: T5's dropout (0.1) is active, so this also checks that primal and tangent share each mask.
    model = make_model(pretrained, kind).double()
    inputs = make_inputs(kind, model)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(3)
    delta = {name: 1e-2 * torch.randn(w.shape, generator=generator, dtype=w.dtype) for name, w in base.items()}
    reference_model = copy.deepcopy(model)

    linearized = LinearizedModel(model)
    with torch.no_grad():
        for name, param in linearized.model.named_parameters():
            param.add_(delta[name])
    torch.manual_seed(11)
    logits = linearized(**inputs).logits
    expected = _taylor_reference(reference_model, inputs, base, delta, seed=11)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-8)
    # ... and not the model itself at w0 + d: the comparison has teeth.
    plain = _plain_logits(reference_model, inputs, {n: base[n] + delta[n] for n in base}, seed=11)
    assert (plain - logits).abs().max() > 1e-6


def test_ftts_matches_central_finite_differences(pretrained):
    model = make_model(pretrained, "clip").double().eval()
    inputs = make_inputs("clip", model)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(4)
    delta = {name: 1e-2 * torch.randn(w.shape, generator=generator, dtype=w.dtype) for name, w in base.items()}
    eps = 1e-4

    def logits_at(scale):
        weights = {name: base[name] + scale * delta[name] for name in base}
        return functional_call(model, weights, args=(inputs["pixel_values"],)).logits.detach()

    expected = logits_at(0.0) + (logits_at(eps) - logits_at(-eps)) / (2 * eps)
    linearized = LinearizedModel(copy.deepcopy(model))
    with torch.no_grad():
        for name, param in linearized.model.named_parameters():
            param.add_(delta[name])
        logits = linearized(pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_ftts_at_the_base_weights_is_the_model(pretrained, kind):
    model = make_model(pretrained, kind).eval()
    inputs = make_inputs(kind, model)
    with torch.no_grad():
        expected = model(**inputs)
        output = LinearizedModel(copy.deepcopy(model)).eval()(**inputs)
    torch.testing.assert_close(output.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base_format", ["classifier", "full_clip"])
def test_ftts_save_and_load_linearized_round_trip(pretrained, tmp_path, base_format):
    base_dir = tmp_path / "base"
    if base_format == "classifier":
        make_model(pretrained, "clip").save_pretrained(base_dir)
    else:
        save_tiny_clip(base_dir, seed=0)  # the full CLIPModel the classifier's vision tower came from
    model = CLIPVisionClassifier.from_pretrained(base_dir, head=pretrained["clip"][1])
    # The base reference defaults to the model's `name_or_path`; the option sets it explicitly.
    options = {"base_model_name_or_path": str(base_dir)} if base_format == "full_clip" else {}
    linearized = apply_finetune_mode(model, "ftts", **options)
    trainer = train(linearized, "clip", tmp_path, steps=1)
    out_dir = tmp_path / "ftts"
    trainer.save_model(str(out_dir))

    config = json.loads((out_dir / "config.json").read_text())
    assert (config["saft_finetune_mode"], config["saft_base_model"]) == ("ftts", str(base_dir))
    assert saved_finetune_mode(out_dir) == "ftts"
    # A normal model folder: the base model's keys, holding w.
    saved = load_file(out_dir / "model.safetensors")
    plain_keys = set(make_model(pretrained, "clip").state_dict())
    assert set(saved) == plain_keys
    for name, param in linearized.model.named_parameters():
        assert torch.equal(saved[name], param.detach())

    inputs = make_inputs("clip", model)
    with torch.no_grad():
        expected = linearized.eval()(pixel_values=inputs["pixel_values"]).logits
        for reloaded in (load_linearized(out_dir), LinearizedModel.from_pretrained(out_dir)):
            assert torch.equal(reloaded.eval()(pixel_values=inputs["pixel_values"]).logits, expected)
            base_weights = dict(reloaded.base_weights.named_buffers())
            assert len(base_weights) == len(plain_keys)


def test_merged_ftts_weights_are_evaluated_with_the_linearised_forward(pretrained):
    base_model = make_model(pretrained, "clip").double().eval()
    inputs = make_inputs("clip", base_model)
    base = {name: p.detach().clone() for name, p in base_model.named_parameters()}
    generator = torch.Generator().manual_seed(5)
    deltas = [
        {n: 5e-2 * torch.randn(w.shape, generator=generator, dtype=w.dtype) for n, w in base.items()} for _ in range(2)
    ]
    finetuned = [{n: base[n] + d[n] for n in base} for d in deltas]
    merged = {n: (finetuned[0][n] + finetuned[1][n]) / 2 for n in base}  # weight averaging

    linearized = load_linearized(merged, base=base_model).eval()
    with torch.no_grad():
        logits = linearized(pixel_values=inputs["pixel_values"]).logits
        singles = [
            load_linearized(w, base=base_model).eval()(pixel_values=inputs["pixel_values"]).logits for w in finetuned
        ]
    average_delta = {n: (deltas[0][n] + deltas[1][n]) / 2 for n in base}
    expected = _taylor_reference(base_model, inputs, base, average_delta, seed=0)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-8)
    # Linear in w: the merge's output is the average of the fine-tunes' outputs.
    torch.testing.assert_close(logits, (singles[0] + singles[1]) / 2, rtol=1e-9, atol=1e-9)
    # `base` was copied, not modified; the plain forward at the merged weights is a different function.
    assert all(torch.equal(p, base[n]) for n, p in base_model.named_parameters())
    assert (_plain_logits(base_model, inputs, merged, seed=0) - logits).abs().max() > 1e-4


def test_trainer_best_checkpoint_reload_restores_the_linearised_weights(pretrained, tmp_path):
    linearized = apply_finetune_mode(make_model(pretrained, "clip"), "ftts")
    trainer = train(
        linearized,
        "clip",
        tmp_path,
        steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # training lowers the loss: the best checkpoint is an early one, not the last
    )
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")
    best_weights = load_file(f"{best}/model.safetensors")
    last_weights = load_file(f"{tmp_path}/run/checkpoint-3/model.safetensors")
    state = linearized.state_dict()
    assert set(state) == set(best_weights)
    assert all(torch.equal(state[name], best_weights[name]) for name in state)
    assert any(not torch.equal(state[name], last_weights[name]) for name in state)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_adapter_saves_as_a_standard_peft_folder_and_reloads_identically(pretrained, tmp_path, kind):
    peft_model = apply_finetune_mode(make_model(pretrained, kind), "lora", r=4, lora_alpha=8)
    trainer = train(peft_model, kind, tmp_path, steps=1)
    out_dir = tmp_path / "adapter"
    trainer.save_model(str(out_dir))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out_dir.iterdir()}
    assert not (out_dir / "model.safetensors").exists()
    adapter_config = json.loads((out_dir / "adapter_config.json").read_text())
    targets = {"clip": {"q_proj", "v_proj"}, "t5": {"q", "v"}}[kind]
    assert (adapter_config["r"], adapter_config["lora_alpha"], set(adapter_config["target_modules"])) == (4, 8, targets)
    adapter = load_file(out_dir / "adapter_model.safetensors")
    assert all(torch.count_nonzero(w) > 0 for name, w in adapter.items() if "lora_B" in name)  # trained

    inputs = make_inputs(kind, _unwrapped(peft_model))
    reloaded = PeftModel.from_pretrained(make_model(pretrained, kind), out_dir).eval()
    with torch.no_grad():
        expected = peft_model.eval()(**inputs).logits
        assert torch.equal(reloaded(**inputs).logits, expected)
        # The adapter does something: the base model alone gives other logits.
        assert not torch.allclose(make_model(pretrained, kind).eval()(**inputs).logits, expected)


def test_lora_default_is_the_public_lora_16_setting(pretrained):
    peft_model = apply_finetune_mode(make_model(pretrained, "t5"), "lora")
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (16, 32, {"q", "v"})
    assert config.task_type == "SEQ_2_SEQ_LM"


@pytest.mark.parametrize(
    "mode, options, error, message",
    [
        ("sgd", {}, ValueError, "'sgd'"),
        ("full", {"r": 8}, ValueError, r"\['r'\]"),
        ("ftlo", {"target_modules": ["query"]}, ValueError, "query"),
        ("lora", {"r": 0}, ValueError, "r must be"),
        ("lora", {"lora_dropout": 1.0}, ValueError, "lora_dropout"),
    ],
)
def test_bad_mode_or_option_is_refused(pretrained, mode, options, error, message):
    with pytest.raises(error, match=message):
        apply_finetune_mode(make_model(pretrained, "t5"), mode, **options)


def _t5_prompts(model, rows=4, length=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, model.config.vocab_size, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # a padded row: the cross-attention must respect the mask at every step
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_ftts_generation_at_the_base_weights_is_the_models_greedy_generation(pretrained):
    model = make_model(pretrained, "t5").double().eval()
    prompts = _t5_prompts(model)
    plain = model.generate(**prompts, max_new_tokens=5, do_sample=False, num_beams=1)
    # An end-of-sequence token that some rows produce early and others not, so finished rows are padded.
    model.generation_config.eos_token_id = int(plain[0, 2])
    expected = model.generate(**prompts, max_new_tokens=5, do_sample=False, num_beams=1)
    assert (expected == model.generation_config.pad_token_id).any() and expected.shape[1] > 3
    generated = LinearizedModel(copy.deepcopy(model)).eval().generate(**prompts, max_new_tokens=5)
    assert torch.equal(generated, expected)


def test_ftts_generation_decodes_the_hand_linearisation_step_by_step(pretrained):
    model = make_model(pretrained, "t5").double().eval()
    prompts = _t5_prompts(model, seed=1)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(6)
    delta = {name: 0.3 * torch.randn(w.shape, generator=generator, dtype=w.dtype) for name, w in base.items()}
    names = list(base)

    # Reference: at every step, f(w0) + J(w0) d of the whole model on the whole decoder prefix, by reverse-mode
    # autograd (no cached encoder output), then the argmax.
    decoder_ids = torch.zeros(4, 1, dtype=torch.long)  # decoder_start_token_id
    margins = []
    for _ in range(4):

        def last_logits(*weights, decoder_ids=decoder_ids):
            kwargs = {**prompts, "decoder_input_ids": decoder_ids, "use_cache": False}
            return functional_call(model, dict(zip(names, weights)), args=(), kwargs=kwargs).logits[:, -1]

        with sdpa_kernel(SDPBackend.MATH):  # the fused kernel has no double backward
            value, tangent = torch.autograd.functional.jvp(last_logits, tuple(base.values()), tuple(delta.values()))
        top2 = (value + tangent).topk(2).values
        margins.append((top2[:, 0] - top2[:, 1]).min())
        decoder_ids = torch.cat([decoder_ids, (value + tangent).argmax(-1, keepdim=True)], dim=1)
    assert min(margins) > 1e-6  # no near-tie that rounding could flip
    # An end-of-sequence token the reference never produces, so no row stops early.
    model.generation_config.eos_token_id = min(set(range(model.config.vocab_size)) - set(decoder_ids.view(-1).tolist()))

    linearized = LinearizedModel(copy.deepcopy(model)).eval()
    with torch.no_grad():
        for name, param in linearized.model.named_parameters():
            param.add_(delta[name])
    assert torch.equal(linearized.generate(**prompts, max_new_tokens=4), decoder_ids)
    # The plain model at w0 + d decodes something else: the comparison has teeth.
    plain = copy.deepcopy(linearized.model).generate(**prompts, max_new_tokens=4, do_sample=False, num_beams=1)
    assert not torch.equal(plain, decoder_ids)


def test_ftts_generation_refuses_what_it_does_not_do(pretrained):
    linearized = apply_finetune_mode(make_model(pretrained, "t5"), "ftts")
    prompt = torch.tensor([[5, 1]])
    with pytest.raises(ValueError, match="greedy search on one process only: got do_sample=True, num_beams=1"):
        linearized.generate(input_ids=prompt, max_new_tokens=2, do_sample=True)
    with pytest.raises(ValueError, match="num_beams=4"):
        linearized.generate(input_ids=prompt, max_new_tokens=2, num_beams=4)
    with pytest.raises(NotImplementedError, match="encoder-decoder models only, not CLIPVisionClassifier"):
        apply_finetune_mode(make_model(pretrained, "clip"), "ftts").generate(input_ids=prompt, max_new_tokens=2)


def test_load_linearized_refuses_mismatched_weights(pretrained, tmp_path):
    base_model = make_model(pretrained, "clip")
    state = dict(base_model.state_dict())
    missing_name = next(iter(state))
    with pytest.raises(ValueError, match=re.escape(missing_name)):
        load_linearized({k: v for k, v in state.items() if k != missing_name}, base=base_model)
    with pytest.raises(ValueError, match="text_model.extra"):
        load_linearized({**state, "text_model.extra": torch.zeros(1)}, base=base_model)
    with pytest.raises(ValueError, match="shape"):
        load_linearized({**state, missing_name: torch.zeros(7)}, base=base_model)
    with pytest.raises(ValueError, match="needs `base`"):
        load_linearized(state)
    base_model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="saft_base_model"):
        load_linearized(tmp_path / "plain")


@pytest.mark.parametrize("mode", ["full", "ftlo"])
def test_full_and_ftlo_save_a_normal_model_folder_marked_with_the_mode(pretrained, tmp_path, mode):
    model = apply_finetune_mode(make_model(pretrained, "t5"), mode)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5)
    model.save_pretrained(tmp_path / mode)
    assert saved_finetune_mode(tmp_path / mode) == mode
    reloaded = type(model).from_pretrained(tmp_path / mode)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in reloaded.state_dict().items())


@pytest.mark.slow
def test_ftts_under_ddp_all_reduces_the_gradient_of_w(tmp_path):
    # Two gloo processes on CPU, each on different rows: only if DDP all-reduces the gradients reaching `w` through
    # the jvp do both ranks end with the same weights.
    worker = Path(__file__).with_name("ftts_ddp_worker.py")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(tmp_path)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    pretrained = dict(build_tiny_t5(seed=0)[0].named_parameters())
    assert all(r["distributed_type"] == "MULTI_CPU" for r in ranks)
    assert ranks[0]["first_loss"] != ranks[1]["first_loss"]
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name])
    assert all(not torch.equal(w, pretrained[name]) for name, w in ranks[0]["weights"].items())
    assert all(r["base_weights_intact"] for r in ranks)
    assert len(ranks[0]["ignored_by_ddp"]) == len(pretrained)  # w0 is not broadcast before every forward
