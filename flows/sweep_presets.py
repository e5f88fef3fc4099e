"""Named sweeps (``python -m flows.sweep --preset NAME``): the overrides every trial shares (``base``, left out
of the trial names; a trial's own value of a key wins), the trials (each a list of overrides; a value that
lists several, ``k=1,2``, makes a grid), and the DVC stages a trial reproduces (``targets``, with what they
need upstream; empty: the whole pipeline).

``study`` tests the paper's claims (docs/study.md): every model is evaluated on the whole test split (358
named OpenMoji prompts) x 1 seed with bootstrap CIs over prompts (2 seeds made it 4 h 30 min here), and
``knn-diffusion report`` / ``flows.study_doc`` turn the runs into the claims table. What it runs, per backbone
unless said (sizes and wall time: docs/study.md):

- the kNN model (``tokens``, k=10, tiny) at k in {0, 1, 5, 10, 20} and its first retrieved image (Fig. 9, Fig. 2);
- the same model at index fraction {0.1, 0.3, 0.5, 0.7, 1.0} (Sec. 6.5), guidance {1, 3, 8} at k=10 (lambda = 8),
  and with the swapped Noto index (out of distribution) - inference only: the model comes from DVC's run cache;
- a trained ``no_knn`` model (Tab. 1), and both again at a second size (Fig. 10): ``micro``, a quarter of tiny's
  parameters, on this 2-core machine (``small``, 4x tiny, trained 45 min a model here); ``small`` on a GPU;
- the other three kNN conditioning variants on the discrete backbone (Sec. 6.5).

Settings are the val-chosen defaults of params.yaml; nothing here is tuned on the test split.
``study-gpu`` is the same study at 64 px with 5 seeds and ``small`` as the second size, for a GPU worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.sweep_plan import GRID_SEPARATOR


@dataclass(frozen=True)
class SweepPreset:
    base: tuple[str, ...]
    trials: tuple[tuple[str, ...], ...]
    targets: tuple[str, ...] = ()

    def axes(self) -> list[str]:
        """The trials as the sweep's axes: one grid each, '+' between them."""
        axes: list[str] = []
        for trial in self.trials:
            axes += [*([GRID_SEPARATOR] if axes else []), *trial]
        return axes


def _both(key: str, value: str) -> tuple[str, str]:
    """One training setting for both backbones."""
    return f"train_continuous.{key}={value}", f"train_discrete.{key}={value}"


STUDY_BASE = ("evaluate.count=0", "evaluate.seeds=1", "evaluate.grid.k=[0,10]", "evaluate.grid.index_fraction=[1.0]",
              "evaluate.grid.index=[openmoji]", "evaluate.retrieval_baseline=false")


def study_trials(second_size: str) -> tuple[tuple[str, ...], ...]:
    """The study's trials, with ``second_size`` as Fig. 10's other model size."""
    return (
        ("evaluate.grid.k=[0,1,5,10,20]", "evaluate.retrieval_baseline=true"),  # Fig. 9, Fig. 2
        ("evaluate.grid.k=[10]", "evaluate.grid.index_fraction=[0.1,0.3,0.5,0.7,1.0]"),  # Sec. 6.5 index size
        ("evaluate.grid.k=[10]", "evaluate.continuous.guidance=[1.0,3.0,8.0]",
         "evaluate.discrete.guidance=[1.0,3.0,8.0]"),  # lambda
        ("evaluate.grid.k=[10]", "evaluate.grid.index=[openmoji,noto]"),  # out-of-distribution index
        _both("variant", "no_knn"),  # Tab. 1's no-kNN model
        _both("preset", second_size),  # Fig. 10: a second size ...
        (*_both("preset", second_size), *_both("variant", "no_knn")),  # ... with and without kNN
        ("train_discrete.variant=self_attention,cross_attention_pooled,concat_linear",),  # Sec. 6.5 variants
    )


EVALUATE = ("evaluate@continuous", "evaluate@discrete")
# The paper's explicit settings vs today's defaults, on the val split (docs/defaults.md, flows/defaults_doc.py):
# lambda 8 vs 3 (continuous), VQ-Diffusion's auxiliary weight 5e-4 vs 1.0 and importance vs uniform timesteps.
DEFAULTS_BASE = ("evaluate.split=val", "evaluate.count=0", "evaluate.seeds=2", "evaluate.grid.k=[10]",
                 "evaluate.grid.index_fraction=[1.0]", "evaluate.grid.index=[openmoji]",
                 "evaluate.retrieval_baseline=false", "evaluate.continuous.guidance=[3.0,8.0]",
                 "train_discrete.timestep_sampling=uniform")  # both values named: independent of params.yaml
DEFAULTS_TRIALS = (("train_discrete.aux_weight=1.0,0.0005",), ("train_discrete.timestep_sampling=importance",))
GPU = ("data.resolution=64", "encoder.vision.image_size=64", "judge.vision.image_size=64", "evaluate.seeds=5")

PRESETS = {
    "study": SweepPreset(STUDY_BASE, study_trials("micro"), EVALUATE),
    "study-gpu": SweepPreset(STUDY_BASE + GPU, study_trials("small"), EVALUATE),
    "defaults": SweepPreset(DEFAULTS_BASE, DEFAULTS_TRIALS, EVALUATE),
}
