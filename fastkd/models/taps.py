"""Stage features, embeddings and logits from any timm model, in one forward pass.

Uses timm's ``feature_info``, ``forward_intermediates``, ``forward_features`` and
``forward_head(pre_logits=True)``, so any timm model (CNN, Swin, ViT, ...) works without
hand-written shape tables.
"""

from dataclasses import dataclass

NUM_STAGES = 4


@dataclass(frozen=True)
class StageTap:
    """Where stage ``stage`` (1-based) of a model comes out, and its shape."""

    stage: int
    feature_index: int  # index into the model's feature_info / forward_intermediates
    channels: int
    reduction: int  # input pixels per feature pixel
    tokens: bool  # [B, N, c] tokens (isotropic transformers) rather than [B, c, h, w] maps


def _feature_info(model, role):
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{role} {type(model).__name__} has no feature taps: HCD needs a timm model with "
            "feature_info and forward_intermediates()"
        )
    return list(info)


def stage_taps(model, stages=()):
    """The taps of the requested stages (1-based) of ``model``; ``()``: all of its stages.

    A pyramid (CNN, Swin) has a stage per resolution: stage i is the last feature at the i-th of
    its (at most four) coarsest reductions (ImageNet ResNet: layer1..layer4; CIFAR ResNet: its
    three stages). An isotropic model (ViT, DeiT) has one resolution: stage i is the block that
    ends the i-th quarter of its depth, read as tokens.
    """
    info = _feature_info(model, "student")
    reductions = [entry["reduction"] for entry in info]
    distinct = sorted(set(reductions))
    if len(distinct) >= 2:
        last_at = {reduction: index for index, reduction in enumerate(reductions)}
        indices = [last_at[reduction] for reduction in distinct[-NUM_STAGES:]]
        tokens = False
    elif len(info) >= NUM_STAGES:
        indices = [round(quarter * len(info) / NUM_STAGES) - 1
                   for quarter in range(1, NUM_STAGES + 1)]
        tokens = True
    else:
        raise ValueError(
            f"student {type(model).__name__} has feature reductions {reductions}: expected a "
            "pyramid of stages, or an isotropic model with at least four blocks")
    available = tuple(range(1, len(indices) + 1))
    stages = tuple(stages) or available
    if any(stage not in available for stage in stages):
        raise ValueError(f"stages must be a subset of {available} for "
                         f"{type(model).__name__}, got {stages}")
    return [StageTap(stage, indices[stage - 1], info[indices[stage - 1]]["num_chs"],
                     info[indices[stage - 1]]["reduction"], tokens) for stage in stages]


def student_outputs(model, images, taps):
    """``(logits, [stage features])``: maps ``[B, c, h, w]`` or tokens ``[B, N, c]`` per tap."""
    final, intermediates = model.forward_intermediates(
        images, indices=[tap.feature_index for tap in taps],
        output_fmt="NLC" if taps[0].tokens else "NCHW")
    return model.forward_head(final), intermediates


def teacher_outputs(model, images):
    """``(logits, embedding)``: the embedding is the vector fed to the classifier."""
    features = model.forward_features(images)
    return model.forward_head(features), model.forward_head(features, pre_logits=True)


def embedding_width(model):
    """Width of the vector ``forward_head(pre_logits=True)`` returns."""
    return getattr(model, "head_hidden_size", None) or model.num_features
