"""Peak accelerator memory of an SDXL LCM run, from its settings alone: the estimate `simpletuner-lcm validate` prints.

Pure arithmetic, no torch: parameter counts of SDXL base 1.0 (tests/unit/test_memory_estimate.py counts them on
meta-device models) times the bytes of their precision, the optimizer's state per trainable parameter, and
activation terms fitted to measurements (bench/memory_fit.py; README "Will it fit?" gives each error). A run passes
through three phases that never hold memory at the same time; its peak is the largest:

    caching     text encoders, VAE, one VAE encode batch (SimpleTuner loads the UNet only after caching)
    training    UNet, trainable weights, gradients, optimizer state, EMA and LCM target copies, one step's activations
    validation  the training state, the VAE, and the LCM quality check at its smallest batch (it sizes its pipeline
                calls and VAE decodes to the memory left: one sample per call, doubled by the teacher's CFG, and
                one image per decode is what it needs)

Every phase adds CUDA_CONTEXT_BYTES for the CUDA context and allocator slack, which torch's allocation counters miss.
Only model_family "sdxl" has fitted terms; other families get no estimate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GIB = 2**30
MEGAPIXEL = 2**20  # a 1024x1024 image

# Parameter counts of stabilityai/stable-diffusion-xl-base-1.0 (lcm_plugin.real_sdxl's configs; checked by the tests).
SDXL_UNET_PARAMETERS = 2_567_463_684
# The Linear and Conv2d weights among them: what quanto, torchao, bitsandbytes and SDNQ quantize; the rest (biases,
# norms) stays in the base dtype.
SDXL_UNET_QUANTIZABLE_PARAMETERS = 2_565_880_320
SDXL_TEXT_ENCODER_PARAMETERS = 123_060_480 + 694_659_840  # CLIP ViT-L/14 text, OpenCLIP ViT-bigG/14 text + projection
SDXL_VAE_PARAMETERS = 83_653_863
# LoRA parameters per unit of rank for each PEFT target name in SDXL's UNet: the sum over matching layers of
# in_features + out_features (Linear) or in_channels * kernel area + out_channels (Conv2d).
SDXL_LORA_PARAMETERS_PER_RANK = {
    "to_q": 332_800,
    "to_k": 392_960,
    "to_v": 392_960,
    "to_out.0": 332_800,
    "proj_in": 21_760,
    "proj_out": 21_760,
    "ff.net.0.proj": 748_800,
    "ff.net.2": 416_000,
    "time_emb_proj": 35_520,
    "conv1": 189_440,
    "conv2": 137_600,
    "conv_shortcut": 23_040,
    "conv": 28_800,  # the down- and upsamplers' convolutions
}
# SimpleTuner 4.10.1's SDXL.DEFAULT_LORA_TARGET.
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")

CUDA_CONTEXT_BYTES = 0.5 * GIB

# Bytes per weight of SimpleTuner's base_model_precision choices (quantized Linear/Conv2d weights; scales are
# per output channel or per block and add under 1%, except nf4's absmax per 64 weights).
QUANTIZED_WEIGHT_BYTES = {
    "int8-quanto": 1.0, "int4-quanto": 0.5, "int2-quanto": 0.25, "fp8-quanto": 1.0, "fp8uz-quanto": 1.0,
    "int8-torchao": 1.0, "int8dq-torchao": 1.0, "int8dq-int4-torchao": 0.5, "int4-torchao": 0.5,
    "fp8-torchao": 1.0, "fp8wo-torchao": 1.0, "fp8-int4-torchao": 0.5, "fp8-native": 1.0,
    "fp8-transformerengine": 1.0, "nf4-bnb": 0.5 + 4 / 64,
    "int8-sdnq": 1.0, "uint8-sdnq": 1.0, "int16-sdnq": 2.0, "uint16-sdnq": 2.0, "fp16-sdnq": 2.0, "fp8-sdnq": 1.0,
    "int6-sdnq": 0.75, "int5-sdnq": 0.625, "uint5-sdnq": 0.625, "uint4-sdnq": 0.5, "uint3-sdnq": 0.375,
    "uint2-sdnq": 0.25,
}

# Optimizer state per trainable parameter, as (states in the parameter's dtype, extra bytes). Read from each
# optimizer's step: AdamW keeps exp_avg and exp_avg_sq; SimpleTuner's adamw_bf16 adds a bf16 shift buffer (Kahan);
# optimi adds a Kahan compensation buffer for bf16/fp16 parameters (counted below); 8-bit optimizers keep one byte per
# state; Adafactor's factored moments and SGD without momentum keep almost nothing.
OPTIMIZER_STATES = {
    "adamw_bf16": (3, 0.0),
    "torch-adam": (2, 0.0), "torch-adamw": (2, 0.0), "torch-radam": (2, 0.0), "torch-nadam": (2, 0.0),
    "torch-adamax": (2, 0.0), "torch-sparseadam": (2, 0.0), "torch-adadelta": (2, 0.0), "torch-rmsprop": (1, 0.0),
    "torch-adagrad": (1, 0.0), "torch-asgd": (1, 0.0), "torch-sgd": (0, 0.0), "torch-adafactor": (0, 0.0),
    "optimi-adamw": (2, 0.0), "optimi-adam": (2, 0.0), "optimi-stableadamw": (2, 0.0), "optimi-radam": (2, 0.0),
    "optimi-lion": (1, 0.0), "optimi-sgd": (1, 0.0), "optimi-ranger": (3, 0.0), "optimi-adan": (4, 0.0),
    "adamw_schedulefree": (2, 0.0), "adamw_schedulefree+aggressive": (2, 0.0), "adamw_schedulefree+no_kahan": (2, 0.0),
    "prodigy": (3, 0.0), "soap": (2, 0.0), "muon": (1, 0.0),
    "bnb-adamw8bit": (0, 2.0), "bnb-adam8bit": (0, 2.0), "bnb-adamw8bit-paged": (0, 2.0), "bnb-lion8bit": (0, 1.0),
    "bnb-lion8bit-paged": (0, 1.0), "bnb-adagrad8bit": (0, 1.0), "bnb-ademamix8bit": (0, 3.0),
    "bnb-ademamix8bit-paged": (0, 3.0),
    "bnb-adamw": (0, 8.0), "bnb-adam": (0, 8.0), "bnb-adamw-paged": (0, 8.0), "bnb-lion": (0, 4.0),
    "bnb-lion-paged": (0, 4.0), "bnb-adagrad": (0, 4.0), "bnb-ademamix": (0, 12.0), "bnb-ademamix-paged": (0, 12.0),
    "ao-adamw8bit": (0, 2.0), "ao-adamw4bit": (0, 1.0), "ao-adamfp8": (0, 2.0), "ao-adamwfp8": (0, 2.0),
    "sdnq-adamw": (0, 2.0), "sdnq-adamw+no_quant": (2, 0.0), "sdnq-adafactor": (0, 0.0), "sdnq-came": (0, 0.0),
    "sdnq-lion": (0, 1.0), "sdnq-muon": (0, 1.0), "sdnq-muon+quantized_matmul": (0, 1.0),
}
KAHAN_OPTIMIZER_PREFIXES = ("optimi-",)
ASSUMED_OPTIMIZER_STATES = (2, 0.0)

# Activation bytes per sample-megapixel, and a constant, for each piece: bf16 activations, fitted by
# `bench/memory_fit.py --fit` to peak resident memory minus what was held before, on a CPU (README "Will it fit?" gives
# each measurement and error). The one GPU figure so far allocates about 3x less for the step: the estimate errs
# towards "does not fit".
# Training step: our LCM step (teacher at twice the batch and target without grad, student with grad, backward).
STEP_ACTIVATIONS_CHECKPOINTED = (1.807 * GIB, 0.079 * GIB)
STEP_ACTIVATIONS_FULL = (7.858 * GIB, 0.003 * GIB)
# The UNet without grad (validation, the quality check), per sample of the UNet batch.
INFERENCE_ACTIVATIONS = (0.257 * GIB, 0.063 * GIB)
# The VAE without grad: encoding (caching) and decoding (validation) images.
VAE_ENCODE_ACTIVATIONS = (1.245 * GIB, 0.026 * GIB)
VAE_DECODE_ACTIVATIONS = (1.988 * GIB, 0.035 * GIB)

# The quality check's smallest batch (lcm_plugin.quality_check.sampling_batches sizes its batches to the free memory, down
# to this): samples per pipeline call, doubled by the teacher's CFG, and images per VAE decode.
QUALITY_CHECK_SAMPLES_PER_CALL = 1


@dataclass(frozen=True)
class Term:
    label: str
    bytes: float


@dataclass(frozen=True)
class Phase:
    name: str
    terms: tuple[Term, ...]

    @property
    def bytes(self) -> float:
        return sum(term.bytes for term in self.terms)

    def line(self) -> str:
        parts = " + ".join(f"{term.label} {term.bytes / GIB:.2f}" for term in self.terms if term.bytes > 0)
        return f"  {self.name}: {self.bytes / GIB:.1f} GiB = {parts}"


@dataclass(frozen=True)
class MemoryEstimate:
    phases: tuple[Phase, ...]

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda phase: phase.bytes)

    @property
    def peak_gib(self) -> float:
        return self.peak.bytes / GIB

    def lines(self) -> list[str]:
        """`estimated peak GPU memory: N GiB (phase)`, then each phase with its terms in GiB."""
        return [f"estimated peak GPU memory: {self.peak_gib:.1f} GiB ({self.peak.name})",
                *(phase.line() for phase in self.phases)]


def activation_bytes(coefficients: tuple[float, float], samples: float, megapixels: float) -> float:
    per_sample_megapixel, constant = coefficients
    return per_sample_megapixel * samples * megapixels + constant


def image_megapixels(resolution: Any, resolution_type: Any) -> float:
    """Pixel area of a square training image in MEGAPIXEL units: `resolution` is an edge in pixels for 'pixel' and
    'pixel_area', megapixels (1e6 pixels) for 'area' (SimpleTuner's multiaspect/image.py)."""
    value = float(resolution)
    if resolution_type == "area":
        return value * 1e6 / MEGAPIXEL
    return value * value / MEGAPIXEL


def validation_megapixels(validation_resolution: Any) -> float:
    """The first of SimpleTuner's validation_resolution sizes ('1024', '1024x1024', 'WxH,WxH', a number under 128 is
    megapixels): where the quality check samples."""
    first = str(validation_resolution).split(",")[0].strip()
    if "x" in first:
        width, height = (float(side) for side in first.split("x"))
        return width * height / MEGAPIXEL
    value = float(first)
    return value * 1e6 / MEGAPIXEL if value < 128 else value * value / MEGAPIXEL


def lora_targets(value: Any) -> list[str]:
    """peft_lora_target_modules as SimpleTuner holds it (a list, or the JSON text of one), else SDXL's defaults."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [value]
    return [str(name) for name in value] if isinstance(value, (list, tuple)) and value else list(DEFAULT_LORA_TARGETS)


def lora_parameters(rank: int, targets: list[str] | tuple[str, ...]) -> int:
    """LoRA parameters of SDXL's UNet at `rank` on PEFT `targets` (names it does not have add nothing)."""
    return rank * sum(SDXL_LORA_PARAMETERS_PER_RANK.get(name, 0) for name in dict.fromkeys(targets))


def optimizer_state_bytes(optimizer: str, parameters: int, parameter_bytes: float) -> tuple[float, bool]:
    """(bytes of optimizer state for `parameters` trainable parameters, whether the optimizer is known)."""
    states, extra = OPTIMIZER_STATES.get(optimizer, ASSUMED_OPTIMIZER_STATES)
    if optimizer.startswith(KAHAN_OPTIMIZER_PREFIXES) and parameter_bytes < 4:
        states += 1
    return parameters * (states * parameter_bytes + extra), optimizer in OPTIMIZER_STATES


def _on(value: Any) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def estimate_run_memory(settings: Mapping[str, Any], lcm: Mapping[str, Any] | None = None) -> MemoryEstimate | None:
    """The three phases of an SDXL LCM run, from SimpleTuner's resolved settings (option name -> value, defaults
    filled in: `lcm_plugin.config.training.effective_settings`) and the `distillation_config.lcm` block (LcmConfig
    defaults for what it leaves out). None for a model family without fitted terms."""
    if str(settings.get("model_family")).lower() != "sdxl":
        return None
    lcm = lcm or {}
    mixed_precision = str(settings.get("mixed_precision") or "bf16")
    full_model = settings.get("model_type") == "full"
    precision = str(settings.get("base_model_precision") or "no_change")
    quantized = not full_model and precision in QUANTIZED_WEIGHT_BYTES
    # SimpleTuner: weight_dtype is bf16 under mixed_precision bf16, or for a quantized LoRA run with
    # base_model_default_dtype bf16; fp16 under fp16; else fp32 (helpers/configuration/cmd_args.py).
    if mixed_precision in ("bf16", "fp16") or (quantized and settings.get("base_model_default_dtype") != "fp32"):
        parameter_bytes = 2.0
    else:
        parameter_bytes = 4.0
    if settings.get("optimizer") == "adamw_bf16":
        parameter_bytes = 2.0  # SimpleTuner converts the trained parameters to bf16 for it
    megapixels = image_megapixels(settings.get("resolution") or 1024, settings.get("resolution_type"))
    batch_size = int(settings.get("train_batch_size") or 1)
    activation_scale = parameter_bytes / 2.0  # the fits are of bf16 activations

    if quantized:
        unquantized = SDXL_UNET_PARAMETERS - SDXL_UNET_QUANTIZABLE_PARAMETERS
        unet = Term(f"UNet {precision}", SDXL_UNET_QUANTIZABLE_PARAMETERS * QUANTIZED_WEIGHT_BYTES[precision]
                    + unquantized * parameter_bytes)
    else:
        unet = Term(f"UNet {_dtype_name(parameter_bytes)}", SDXL_UNET_PARAMETERS * parameter_bytes)

    optimizer = str(settings.get("optimizer") or "adamw_bf16")
    copies = []
    if full_model:
        trainable = SDXL_UNET_PARAMETERS
        adapter = Term("no adapter", 0.0)
        # The LCM teacher (a frozen copy, in the student's dtype) and the EMA target network, kept in float32
        # (distiller.frozen_copy).
        copies.append(Term("LCM teacher and target copies", SDXL_UNET_PARAMETERS * (parameter_bytes + 4.0)))
    else:
        rank = int(settings.get("lora_rank") or 16)
        trainable = lora_parameters(rank, lora_targets(settings.get("peft_lora_target_modules")))
        adapter = Term(f"LoRA rank {rank} ({trainable / 1e6:.1f}M)", trainable * parameter_bytes)
        if _on(lcm.get("lora_target_ema", False)):
            # The EMA LoRA weights in float32, and the student's own copied aside while the target runs.
            copies.append(Term("LCM target LoRA (EMA)", trainable * (4.0 + parameter_bytes)))
    if _on(settings.get("use_ema")) and settings.get("ema_device") == "accelerator":
        copies.append(Term("SimpleTuner EMA", trainable * parameter_bytes))
    gradients = Term("gradients", trainable * parameter_bytes)
    state_bytes, known = optimizer_state_bytes(optimizer, trainable, parameter_bytes)
    state = Term(f"{optimizer} state" + ("" if known else " (unknown optimizer: 2 states assumed)"), state_bytes)

    checkpointed = _on(settings.get("gradient_checkpointing", True))
    step_activations = Term(
        f"activations ({batch_size} x {megapixels:.2f} MP{', checkpointed' if checkpointed else ''})",
        activation_scale * activation_bytes(
            STEP_ACTIVATIONS_CHECKPOINTED if checkpointed else STEP_ACTIVATIONS_FULL, batch_size, megapixels),
    )
    context = Term("CUDA context", CUDA_CONTEXT_BYTES)
    phases = []

    vae_bytes = 4.0 if settings.get("vae_dtype") == "fp32" else 2.0
    vae = Term(f"VAE {_dtype_name(vae_bytes)}", SDXL_VAE_PARAMETERS * vae_bytes)
    vae_batch = int(settings.get("vae_batch_size") or 4)
    phases.append(Phase("caching", (
        Term(f"text encoders {_dtype_name(parameter_bytes)}", SDXL_TEXT_ENCODER_PARAMETERS * parameter_bytes),
        vae,
        Term(f"VAE encode ({vae_batch} x {megapixels:.2f} MP)",
             vae_bytes / 2.0 * activation_bytes(VAE_ENCODE_ACTIVATIONS, vae_batch, megapixels)),
        context,
    )))
    phases.append(Phase("training", (unet, adapter, gradients, state, *copies, step_activations, context)))

    quality_check = lcm.get("quality_check") if isinstance(lcm.get("quality_check"), Mapping) else {}
    if not _on(settings.get("validation_disable", False)) and _on(quality_check.get("enabled", True)):
        validation_mp = validation_megapixels(settings.get("validation_resolution") or 1024)
        samples = QUALITY_CHECK_SAMPLES_PER_CALL
        sampling = activation_scale * activation_bytes(INFERENCE_ACTIVATIONS, 2 * samples, validation_mp)
        decoding = vae_bytes / 2.0 * activation_bytes(VAE_DECODE_ACTIVATIONS, samples, validation_mp)
        check = (Term(f"quality check VAE decode ({samples} x {validation_mp:.2f} MP)", decoding)
                 if decoding >= sampling else
                 Term(f"quality check UNet ({2 * samples} x {validation_mp:.2f} MP, no grad)", sampling))
        # Gradients are freed (set to None) after each optimizer step; the rest of the training state stays.
        phases.append(Phase("validation", (unet, adapter, state, *copies, vae, check, context)))
    return MemoryEstimate(tuple(phases))


def _dtype_name(parameter_bytes: float) -> str:
    return "bf16" if parameter_bytes == 2.0 else "fp32"
