"""fxgndi's vocabulary: every user-facing choice, named once.

The library validates against these tuples and the CLI offers them as ``choices``, so a word
means one thing everywhere. This module imports nothing, so that ``fxgndi --help`` stays fast.

- *importance*: the quantity that ranks units (channels, groups, blocks): ``gndi``,
  ``ablation``, or a classic criterion.
- *mode*: how the G-NDI tangent is computed (``reverse``, ``forward``, ``probe``); the value
  estimated is the same.
- *readout*: the model output whose change G-NDI differentiates.
- *metric*: how the exact effect of an ablation is measured (``ablate``, ``validate``'s truth).
- *baseline*: the value ``b`` of the intervention ``do(h := b)``.
- *target*: what a pruning budget counts (channels, params, MACs, latency).

Example:
    >>> "probe" in MODES and "weight_taylor" in PRUNE_IMPORTANCES
    True
"""

GRANULARITIES = ("layer", "channel")
SITE_KINDS = ("conv", "linear", "bn", "norm", "act", "block")
BASELINES = ("zero", "mean", "channel-mean")
READOUTS = ("logits", "probs", "loss", "margin", "outputs")
MODES = ("auto", "reverse", "forward", "probe")
# Rademacher probes of probe mode (``auto`` takes them on heads at least twice as wide): the
# smallest of 8 / 16 / 32 / 64 whose within-group Spearman against the exact scores reached
# 0.98 on a 1000-class resnet18 (README, wide heads; benchmarks/scoring_speed.py --pruning-cost).
DEFAULT_PROBES = 8
# GNDIImportance scores every channel of a model at once: one JVP per channel is never cheaper.
PRUNE_MODES = ("auto", "reverse", "probe")
METRICS = ("accuracy", "loss", "logit_l2", "kl")
# What each metric's value is: the effect of the ablation (axis labels, table headers).
METRIC_EFFECTS = {"accuracy": "accuracy drop", "loss": "loss increase",
                  "logit_l2": "logit L2 change", "kl": "KL(original || ablated)"}

# G-NDI variants compared by validate (name -> the score() settings live in gndi/validate.py).
GNDI_VARIANTS = ("gndi", "gndi_path", "gndi_loss", "gndi_margin", "gndi_path_loss")
# Classic criteria scoring output channels of conv / linear layers (gndi/criteria/).
# "activation_taylor" is Molchanov et al. 2017 (activation x gradient); torch-pruning's
# weight x gradient Taylor (Molchanov et al. 2019) is "weight_taylor" in PRUNE_IMPORTANCES.
CRITERIA = ("magnitude_l1", "magnitude_l2", "snip", "grasp", "synflow", "hrank",
            "activation_taylor", "random")
VALIDITY_IMPORTANCES = (*GNDI_VARIANTS, *CRITERIA, "ablation")

# Width pruning: fxgndi's causal importances, then torch-pruning's own criteria.
PRUNE_IMPORTANCES = ("gndi", "ablation", "l1", "l2", "weight_taylor", "hessian", "lamp", "bn",
                     "fpgm", "random")
PRUNE_TARGETS = ("channels", "params", "macs", "latency")
# Depth pruning (whole residual branches).
DEPTH_IMPORTANCES = ("gndi", "ablation", "random")
DEPTH_TARGETS = ("macs", "params", "latency")
# where a latency target is measured (fxgndi.Latency): the module, torch.export, onnxruntime
LATENCY_RUNTIMES = ("eager", "pt2", "onnx")
DEPTH_BASELINES = ("zero", "channel-mean")

EXPORT_FORMATS = {".pt2": "pt2", ".onnx": "onnx", ".ts": "torchscript", ".pth": "state_dict"}
DATA_SPLITS = ("train", "test", "all")


def renamed(word: str) -> str | None:
    """The new name of a word fxgndi no longer uses, for error messages (None if unknown).

    Example:
        >>> renamed("taylor")
        "'weight_taylor' (torch-pruning's weight Taylor) or 'activation_taylor' (validate)"
    """
    return {"taylor": "'weight_taylor' (torch-pruning's weight Taylor) or "
                      "'activation_taylor' (validate)"}.get(word)
