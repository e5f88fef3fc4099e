"""Every stage output path, in one place (dvc.yaml names the same paths; a test checks they agree)."""

from pathlib import Path

DATA = Path("data")
METRICS = Path("metrics")
# Resumable training state lives outside DVC outputs: `dvc repro` deletes outputs before a rerun.
CHECKPOINTS = Path("checkpoints")

INGEST = DATA / "ingest"
# The npm emoji styles' lock (scripts/setup.sh installs them beside it, in node_modules/): an ingest dep.
EMOJI_STYLES_LOCK = Path("emoji-styles") / "package-lock.json"
INGEST_METRICS = METRICS / "ingest.json"

ENCODER = DATA / "encoder"
ENCODER_METRICS = METRICS / "encoder.json"
ENCODER_STATE = CHECKPOINTS / "encoder"

JUDGE = DATA / "judge"  # the evaluation's judge (an aligned model like data/encoder, or a pretrained record)
JUDGE_METRICS = METRICS / "judge.json"
JUDGE_STATE = CHECKPOINTS / "judge"

EMBED = DATA / "embed"
EMBED_METRICS = METRICS / "embed.json"
EVAL_PROMPTS = EMBED / "eval_prompts.npy"  # text embeddings of the generator's held-out names

INDEX = DATA / "index"
INDEX_METRICS = METRICS / "index.json"

KNN = DATA / "knn"
KNN_METRICS = METRICS / "knn.json"

CONTINUOUS_MODEL = Path("models") / "continuous"
CONTINUOUS_STATE = CHECKPOINTS / "train_continuous"
CONTINUOUS_METRICS = METRICS / "train_continuous.json"

TOKENIZER = Path("models") / "tokenizer"  # the VQ model + its used codes
TOKENS = DATA / "tokens"  # <dataset>.npy: the remapped token map of every image, in image-row order
TOKENIZER_METRICS = METRICS / "tokenizer.json"

DISCRETE_MODEL = Path("models") / "discrete"  # the transformer's EMA checkpoint + a copy of the tokenizer
DISCRETE_STATE = CHECKPOINTS / "train_discrete"
DISCRETE_METRICS = METRICS / "train_discrete.json"

MANIPULATION_PAIRS = DATA / "manipulation"  # <dataset>.npz + .json: the edit training pairs
MANIPULATION_PAIRS_METRICS = METRICS / "manipulation_pairs.json"
MANIPULATION_MODEL = Path("models") / "manipulation"  # the fine-tuned editing model (EMA checkpoint)
MANIPULATION_STATE = CHECKPOINTS / "train_manipulation"
MANIPULATION_METRICS = METRICS / "train_manipulation.json"
EVALUATE_MANIPULATION = Path("outputs") / "evaluate_manipulation"  # edits, baselines, grid, edits.csv
EVALUATE_MANIPULATION_METRICS = METRICS / "evaluate_manipulation.json"

PROMPTS = Path("prompts")  # prompt files (sample.prompts_file): a declared dep of the stages that read them
SAMPLES = Path("outputs") / "samples"  # <model>/<index>/: sample@<model>

EVALUATE = Path("outputs") / "evaluate"  # <model>/: evaluate@<model>, a generate-style folder per grid point + baseline

HUMAN_EVAL = Path("outputs") / "human_eval"
HUMAN_EVAL_PACKAGE = HUMAN_EVAL / "package"  # what raters open / what is uploaded
HUMAN_EVAL_KEY = HUMAN_EVAL / "key.json"  # which side is A: never inside the package
HUMAN_EVAL_RESULTS = Path("results") / "human_eval"  # raters' CSVs (human_eval_aggregate.results_dir)
HUMAN_EVAL_METRICS = METRICS / "human_eval.json"
HUMAN_EVAL_TABLE = HUMAN_EVAL / "results.md"
HUMAN_EVAL_AGGREGATE_METRICS = METRICS / "human_eval_aggregate.json"
HUMAN_EVAL_MANIPULATION = HUMAN_EVAL / "manipulation"  # the edit study: package/ + key.json, as above
HUMAN_EVAL_MANIPULATION_KEY = HUMAN_EVAL_MANIPULATION / "key.json"
HUMAN_EVAL_MANIPULATION_METRICS = METRICS / "human_eval_manipulation.json"
HUMAN_EVAL_MANIPULATION_RESULTS = Path("results") / "human_eval_manipulation"  # ..._manipulation.results_dir
HUMAN_EVAL_MANIPULATION_TABLE = HUMAN_EVAL_MANIPULATION / "results.md"
HUMAN_EVAL_AGGREGATE_MANIPULATION_METRICS = METRICS / "human_eval_aggregate_manipulation.json"


def dataset_dir(name: str) -> Path:
    return INGEST / name


def embedding_dir(name: str) -> Path:
    return EMBED / name


def index_dir(name: str) -> Path:
    return INDEX / name


def retrieval_roots():
    """Where the local retrieval backend finds indexes, embeddings and images."""
    from knn_diffusion.retrieval.backends import LocalRoots

    return LocalRoots(index=INDEX, embed=EMBED, ingest=INGEST)


def model_dir(backbone: str) -> Path:
    """The final checkpoint of a backbone's training stage (``models/continuous``, ``models/discrete``)."""
    return CONTINUOUS_MODEL.parent / backbone


def samples_dir(model: str) -> Path:
    return SAMPLES / model


def sample_metrics(model: str) -> Path:
    return METRICS / f"sample-{model}.json"


def evaluate_dir(model: str) -> Path:
    return EVALUATE / model


def evaluate_metrics(model: str) -> Path:
    return METRICS / f"evaluate-{model}.json"


def neighbours_file(name: str) -> Path:
    return KNN / f"{name}.npz"


def tokens_file(name: str) -> Path:
    return TOKENS / f"{name}.npy"


def manipulation_pairs_file(name: str) -> Path:
    return MANIPULATION_PAIRS / f"{name}.npz"
