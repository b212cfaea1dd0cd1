"""The teacher of distillation (CD, `distill.teacher`): which trained workdir can teach which
model, checked when the config is validated, before anything is compiled or written.

The teacher's weights are read with `checkpoint.load` and its denoiser built with
`denoiser.denoiser`, as any trained model's; what is particular to distillation is the rule
that teacher and student fit (a denoiser of the same example shape and classes, and the same
weights' shapes when the student starts from the teacher's weights).
"""

from __future__ import annotations

import ml_collections

from jaxdiff import parameterisations
from jaxdiff.bundle import image_shape
from jaxdiff.checkpoint import latest_step
from jaxdiff.models import create_model, get_network, label_classes, network_param_shapes
from jaxdiff.workdir import read_config


def teacher_problem(teacher: str, config: ml_collections.ConfigDict) -> str | None:
    """Why the workdir `teacher` cannot be distilled into `config`'s model (None if it can): it
    must hold a config and a checkpoint of a denoiser of the same example shape and classes."""
    try:
        saved = read_config(teacher)
    except (FileNotFoundError, ValueError) as e:  # missing, or config.json is not JSON
        return f"the teacher workdir does not load: {e}"
    if latest_step(teacher) is None:
        return f"no checkpoint in the teacher workdir {teacher!r}"
    if not (get_network(saved.model.name).denoises
            and parameterisations.get(saved.diffusion.model_output).denoises):
        return (f"the teacher must be a diffusion model (a denoiser), got a "
                f"{saved.model.name!r} model with output {saved.diffusion.model_output!r}")
    shape, want = image_shape(saved), image_shape(config)
    if shape != want:
        return f"the teacher's examples have shape {shape}, this model's {want}"
    if label_classes(saved) != label_classes(config):
        return (f"the teacher is conditioned on {label_classes(saved)} classes, this model on "
                f"{label_classes(config)} (model.class_cond, data.num_classes)")
    if config.distill.init_from_teacher:
        differences = _weights_differences(saved, config)
        if differences:
            shown = "; ".join(differences[:3]) + (" ..." if len(differences) > 3 else "")
            return (f"distill.init_from_teacher starts the student from the teacher's weights, "
                    f"but their networks differ in {len(differences)} weight(s) (teacher vs "
                    f"student): {shown}; give the student the teacher's model settings or set "
                    f"--config.distill.init_from_teacher=False")
    return None


def _weights_differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict
                         ) -> list[str]:
    """'name: shape_a vs shape_b' for each parameter the networks of two configs do not share
    (shapes traced, nothing computed)."""
    sa, sb = (network_param_shapes(create_model(c), image_shape(c), label_classes(c))
              for c in (a, b))
    return [f"{name}: {sa.get(name, 'absent')} vs {sb.get(name, 'absent')}"
            for name in sorted(set(sa) | set(sb)) if sa.get(name) != sb.get(name)]
