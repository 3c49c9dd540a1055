"""SCQ step 2 (paper §4.1): W4 quantization-aware training on the synthesized tokens.

Fake-quant int4 weights with a straight-through estimator (mgtq.quantization.prepare_qat_), trained
with the masked-token objective of mgtq.training.objective (cross-entropy on the synthesized
tokens, KL to the float model's predictions, or both) on mgtq.training.loop's resumable loop. The
model handed in is copied, never changed.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mgtq.config import plain_config
from mgtq.files import atomic_write_text, save_safetensors
from mgtq.models.transformer import MeissonicTransformer
from mgtq.modules import set_submodule
from mgtq.quantization import FakeQuantLinear, linear_names, prepare_qat_
from mgtq.quantization.api import unmatched_patterns
from mgtq.sampling import SamplerConfig
from mgtq.sampling.schedules import timestep_for_mask_ratio
from mgtq.scq.recipe import QATConfig
from mgtq.scq.synthesis import CalibrationData
from mgtq.training import loop
from mgtq.training.objective import mask_tokens, masked_distillation_loss, masked_token_loss
from mgtq.training.state import keeps_global_rng

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# Which loss terms each qat.objective sums; "kl_to_float" is the distillation term.
OBJECTIVE_TERMS = {"ce": ("ce",), "distill": ("kl_to_float",), "ce+distill": ("ce", "kl_to_float")}


def use_per_channel_weights_(model: torch.nn.Module, name: str) -> None:
    """Give fake-quant layer `name` per-output-channel int4 weights (the grid the int8 GEMM needs)."""
    layer = model.get_submodule(name)
    if not isinstance(layer, FakeQuantLinear):
        raise TypeError(f"{name} is not a fake-quant layer")
    if layer.group_size != layer.in_features:
        set_submodule(model, name, FakeQuantLinear.from_linear(layer, None))


def prepare_fake_quant_(model: torch.nn.Module, cfg: QATConfig, a8_layers=(),
                        input_scales: dict[str, float] | None = None) -> None:
    """W4 fake quant on each layer's export grid: `cfg.group_size` for A16 layers, per channel for
    `a8_layers`, whose inputs are also fake-quantized to int8 when `input_scales` are given."""
    if input_scales is not None:
        prepare_qat_(model, group_size=cfg.group_size, skip=cfg.skip, a8_layers=a8_layers, input_scales=input_scales)
        return
    prepare_qat_(model, group_size=cfg.group_size, skip=cfg.skip)
    for name in a8_layers:
        use_per_channel_weights_(model, name)


def check_fits(transformer: torch.nn.Module, cfg: QATConfig) -> None:
    """Raise ValueError where the recipe's qat section cannot apply to `transformer` (the meta-device model will
    do), so that `mgtq calibrate` says so before synthesizing anything: a `skip` pattern that matches no Linear
    (a typo would quantize the layer it meant), a `group_size` that does not divide a quantized Linear's input
    width."""
    names = linear_names(transformer)
    unused = unmatched_patterns(names, cfg.skip)
    if unused:
        raise ValueError(f"qat.skip pattern {unused[0]!r} matches no nn.Linear of the model (names look like "
                         f"{names[0]!r}; patterns are fnmatch's, e.g. 'transformer_blocks.*.ff.*'); fix it in the "
                         "recipe")
    if cfg.group_size:
        widths = {n: transformer.get_submodule(n).in_features for n in linear_names(transformer, cfg.skip)}
        odd = [n for n, w in widths.items() if w % cfg.group_size]
        if odd:
            fits = math.gcd(*widths.values())
            raise ValueError(f"qat.group_size {cfg.group_size} does not divide the input width of {len(odd)} "
                             f"quantized Linear(s), e.g. {odd[0]} ({widths[odd[0]]}); choose a size that divides "
                             f"every one (their common divisor is {fits}), or add them to qat.skip")


def check_accelerator(cfg: QATConfig) -> None:
    """Raise ValueError where accelerate cannot train as `qat.mixed_precision` says: fp16 without a GPU (accelerate
    would train in float32 and say nothing), or another setting than this process's accelerate already holds
    (one per process)."""
    from accelerate.state import AcceleratorState, is_initialized

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("qat.mixed_precision fp16 needs a CUDA GPU (on the CPU accelerate trains in float32); use "
                         "bf16 or no in the recipe")
    if is_initialized() and AcceleratorState().mixed_precision != cfg.mixed_precision:
        raise ValueError(f"qat.mixed_precision {cfg.mixed_precision!r}: this Python process already trained with "
                         f"{AcceleratorState().mixed_precision!r}, and accelerate holds one setting per process; run "
                         "this recipe in a new process (e.g. `mgtq calibrate`)")


def _conditioning(data: CalibrationData, idx: torch.Tensor, drop: torch.Tensor):
    text = torch.where(drop[:, None, None], data.uncond_text.expand(len(idx), -1, -1), data.text[idx])
    pooled = torch.where(drop[:, None], data.uncond_pooled.expand(len(idx), -1), data.pooled[idx])
    return text, pooled


def _masked_inputs(model, data: CalibrationData, idx, drop, generator, sampler: SamplerConfig, device):
    """(the model's keyword inputs, target tokens, mask) of samples `idx` with freshly drawn masks."""
    tokens = data.tokens[idx].to(device)
    text, pooled = _conditioning(data, idx, drop)
    transformer = model.module if hasattr(model, "module") else model
    masked, mask, ratio = mask_tokens(tokens, transformer.mask_token_id, generator)
    timestep = timestep_for_mask_ratio(sampler.convention, ratio, sampler.num_steps, sampler.schedule,
                                       sampler.rho)
    inputs = dict(hidden_states=masked, encoder_hidden_states=text.to(device), pooled_projections=pooled.to(device),
                  timestep=torch.as_tensor(timestep, device=device),
                  micro_conds=data.micro_conds.to(device).expand(len(idx), 5))
    return inputs, tokens, mask


def _terms(model, inputs: dict, tokens, mask, terms, teacher) -> dict[str, torch.Tensor]:
    logits = model(**inputs)
    out = {}
    if "ce" in terms:
        out["ce"] = masked_token_loss(logits, tokens, mask)
    if "kl_to_float" in terms:
        with torch.no_grad():
            teacher_logits = teacher(**inputs)
        out["kl_to_float"] = masked_distillation_loss(logits, teacher_logits, mask)
    return out


def qat_terms(model, data: CalibrationData, idx, drop, generator, sampler: SamplerConfig, device,
              terms=("ce",), teacher: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Loss terms on synthesized tokens from one student forward, timesteps in the sampler's convention.

    "ce" is the masked-token cross-entropy on the synthesized tokens; "kl_to_float" needs `teacher`,
    the float transformer, run on the same masked inputs.
    """
    if "kl_to_float" in terms and teacher is None:
        raise ValueError("the distillation term needs the float teacher model (qat.objective distill or ce+distill)")
    return _terms(model, *_masked_inputs(model, data, idx, drop, generator, sampler, device), terms, teacher)


def qat_loss(model, data: CalibrationData, idx, drop, generator, sampler: SamplerConfig, device,
             objective: str = "ce", teacher: torch.nn.Module | None = None) -> torch.Tensor:
    """The QAT objective (see QATConfig.objective): the sum of its terms from :func:`qat_terms`."""
    return sum(qat_terms(model, data, idx, drop, generator, sampler, device, OBJECTIVE_TERMS[objective],
                         teacher).values())


# Logit elements one evaluation forward may produce (512 MiB in fp32): a few samples a forward at 1024 px
# (8192 × 64 × 64 each), where all 64 at once need ~17 GiB with the loss's copies; a small model's whole set fits
# in one forward, so its figures are those of a single batch.
EVAL_LOGITS = 1 << 27


def eval_chunk(sample_logits: int, budget: int = EVAL_LOGITS) -> int:
    """Samples per evaluation forward when one sample's logits have `sample_logits` elements."""
    return max(1, budget // sample_logits)


def fixed_eval_metrics(model, data: CalibrationData, sampler: SamplerConfig, device, n: int = 64, seed: int = 1234,
                       teacher: torch.nn.Module | None = None, chunk: int | None = None) -> dict[str, float]:
    """CE (the fit to the calibration set) and, given the float `teacher`, the KL to it, on a fixed set
    of masks (the same every call): each the mean over all masked positions of the n samples, as one
    batch gives it, computed `chunk` samples a forward (default :func:`eval_chunk`'s)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, data.tokens.shape[0], (n,), generator=gen)
    terms = ("ce",) if teacher is None else ("ce", "kl_to_float")
    with torch.no_grad():
        inputs, tokens, mask = _masked_inputs(model, data, idx, torch.zeros(n, dtype=torch.bool), gen, sampler,
                                              device)
        transformer = model.module if hasattr(model, "module") else model
        chunk = chunk or eval_chunk(transformer.config.codebook_size * tokens[0].numel())
        sums = dict.fromkeys(terms, 0.0)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            values = _terms(model, {k: _rows(v, rows, n) for k, v in inputs.items()}, tokens[rows], mask[rows],
                            terms, teacher)
            # each term is a mean over the chunk's masked positions (at least one a sample): weighted by their
            # count, the sum is the whole set's (and one chunk's value comes back unchanged: float64 holds the
            # product of a float32 and a count exactly)
            count = int(mask[rows].sum())
            for k, v in values.items():
                sums[k] += float(v) * count
    total = int(mask.sum())
    return {k: v / total for k, v in sums.items()}


def _rows(value: torch.Tensor, rows: slice, n: int) -> torch.Tensor:
    """The samples `rows` of a per-sample input; one shared by all samples (a 0-d timestep) as it is."""
    return value[rows] if value.dim() and value.shape[0] == n else value


def float_state_dict(model: torch.nn.Module, reference_keys) -> dict[str, torch.Tensor]:
    """The float (latent) weights of a fake-quant model, under the plain model's keys."""
    sd = model.state_dict()
    missing = set(reference_keys) - set(sd)
    if missing:
        raise RuntimeError(f"QAT model lost parameters: {sorted(missing)[:5]}")
    return {k: sd[k].detach().contiguous().cpu() for k in reference_keys}


def qat_student(transformer: MeissonicTransformer, cfg: QATConfig, a8_layers=(),
                input_scales: dict[str, float] | None = None) -> MeissonicTransformer:
    """The model QAT trains: an fp32 copy of `transformer` in training mode with fake quant on each layer's export
    grid (:func:`prepare_fake_quant_`), every parameter trainable, blocks checkpointed as `cfg` says."""
    student = copy.deepcopy(transformer).float().train()
    prepare_fake_quant_(student, cfg, a8_layers, input_scales)
    for p in student.parameters():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return student


def adamw_options(device_type: str) -> dict:
    """torch.optim.AdamW's keyword arguments for parameters on `device_type`.

    CUDA: the fused kernel. torch's default there (foreach) allocates a temporary the size of all the weights at
    each step (3.75 GiB at Meissonic's 1B parameters) and launches more kernels. Elsewhere torch's default, which
    keeps CPU runs (and the published tiny-model figures) bit-identical to those before this choice.
    """
    return {"fused": True} if device_type == "cuda" else {}


@dataclass
class QATResult:
    """The trained float (latent) weights under the plain model's keys, and what stage.json records."""

    weights: dict[str, torch.Tensor]
    summary: dict


@keeps_global_rng
def train_qat(transformer: MeissonicTransformer, data: CalibrationData, cfg: QATConfig, sampler: SamplerConfig,
              state_dir: Path, fingerprint: str, progress: bool = True, a8_layers=(),
              input_scales: dict[str, float] | None = None) -> QATResult:
    """W4 QAT of a copy of `transformer`; resumable from `state_dir` while `fingerprint` matches; NaN-guarded.

    Each layer trains on its export grid (see :func:`prepare_fake_quant_`): `a8_layers` per channel,
    with int8 inputs at `input_scales` when given (qat.activations_in_loop).

    Under `accelerate launch` every process calls this (data-parallel); each draws its own batches.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation)
    reference_keys = list(transformer.state_dict().keys())
    # The float model, frozen: the distillation teacher, and the yardstick of how far QAT drifts from it.
    # Only distillation pays for this copy (a 1B-parameter model's is 4 GB in fp32).
    teacher = copy.deepcopy(transformer).float().eval().requires_grad_(False) if cfg.objective != "ce" else None
    student = qat_student(transformer, cfg, a8_layers, input_scales)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  **adamw_options(accelerator.device.type))
    model, optimizer = accelerator.prepare(student, optimizer)
    device = accelerator.device
    if teacher is not None:
        teacher.to(device)

    def fixed_metrics(m) -> dict:
        return fixed_eval_metrics(m, data, sampler, device, teacher=teacher)

    # each process draws its own batches: a state saved under another process count would go on as neither run
    identity = {"fingerprint": fingerprint, "processes": accelerator.num_processes}
    # save_final: the state after the last step is kept before the closing evaluation, so a run that fails there
    # (out of memory, killed) resumes to that evaluation instead of training the steps since the last save again
    settings = loop.LoopSettings(steps=cfg.steps, save_every=cfg.save_every, accumulation=cfg.gradient_accumulation,
                                 save_final=True, desc="SCQ 2/4 QAT",
                                 nan_hint="lower qat.lr in the recipe and run `mgtq calibrate` again to resume")
    start, saved = loop.resume(accelerator, state_dir, model, optimizer, identity=identity, settings=settings)
    loss_before = saved["loss_before"] if start else fixed_metrics(model)

    def loss_fn(step: int, micro: int) -> torch.Tensor:
        # Per process, step and micro-batch: reproducible after a resume, distinct across processes.
        # hash() of a tuple of ints is deterministic (only str hashes are salted); it is kept rather than
        # mgtq.seeding.derive_seed so runs and the published SCQ figures stay byte-identical.
        gen = torch.Generator().manual_seed(hash((cfg.seed, step, micro, accelerator.process_index)) % 2**62)
        idx = torch.randint(0, data.tokens.shape[0], (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_drop
        return qat_loss(model, data, idx, drop, gen, sampler, device, cfg.objective, teacher)

    losses = loop.train(accelerator, model, optimizer, loss_fn, settings, state_dir, start,
                        {**saved, **identity, "loss_before": loss_before}, progress=progress)
    del optimizer  # its state (twice the weights in fp32) is no use to the closing evaluation: freed before it
    accelerator.free_memory()
    unwrapped = accelerator.unwrap_model(model)
    loss_after = fixed_metrics(unwrapped)
    summary = {"steps": cfg.steps, "processes": accelerator.num_processes, "objective": cfg.objective,
               "loss_before": loss_before, "loss_after": loss_after,
               "train_loss_last": float(np.mean(losses[-10:])) if losses else None,
               "group_size": cfg.group_size, "skip": list(cfg.skip)}
    if cfg.needs_a8_set:
        summary.update(a8_layers=len(a8_layers), activations_in_loop=cfg.activations_in_loop)
    return QATResult(float_state_dict(unwrapped, reference_keys), summary)


def save_float_transformer(config, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """The QAT weights as a plain float MeissonicTransformer folder (config.json + safetensors)."""
    save_safetensors(weights, folder / WEIGHTS_FILE)
    atomic_write_text(folder / "config.json", json.dumps(plain_config(config), indent=2))


def fake_quant_transformer(folder: Path, cfg: QATConfig, a8_layers=()) -> MeissonicTransformer:
    """The QAT weights in `folder` with the same W4 fake quant as in training (the model SCQ measures
    and calibrates): `a8_layers` per channel, activations float."""
    try:
        model = MeissonicTransformer.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        model = model.float().eval()
    except Exception as err:
        raise ValueError(f"the QAT weights in {folder} are damaged ({str(err)[:200]}); delete {folder.parent} "
                         "and run `mgtq calibrate` again") from err
    prepare_fake_quant_(model, cfg, a8_layers)
    return model
