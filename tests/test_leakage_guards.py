"""Every guard against train/test leakage has a test that fails when the guard is removed.

- the encoder never aligns on a name of the generator's test split (its recall is on unseen names);
- the generator's index holds only its train split (training neighbours never show held-out images);
- the test split never reaches generator training (the knn table's rows, and the stage refuses others);
- the eval prompts come from the test split only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from knn_diffusion.config import load_params
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.store import load_text_embeddings
from knn_diffusion.retrieval.index import load_index
from knn_diffusion.retrieval.inference import index_ids
from knn_diffusion.stages import encoder, paths, train_continuous
from tests.conftest import copy_outputs

GENERATOR = "openmoji"


def _splits(root) -> ImageStore:
    return ImageStore.open(root / paths.dataset_dir(GENERATOR))


class AlignmentReached(Exception):
    pass


def test_encoder_drops_pairs_named_like_the_test_split(tiny_pipeline, tmp_path, monkeypatch):
    root = copy_outputs(tiny_pipeline, tmp_path / "repo", str(paths.INGEST))
    test_names = sorted(set(_splits(root).read_captions().loc[_splits(root).rows("test")].dropna()))
    noto_captions = root / paths.dataset_dir("noto") / "captions.parquet"
    captions = pd.read_parquet(noto_captions)
    captions.loc[:2, "caption"] = test_names[:3]  # the paired corpus now holds three held-out names
    captions.to_parquet(noto_captions, index=False)
    seen: list[str] = []

    def record(images, names, *args, **kwargs):
        seen.extend(names)
        raise AlignmentReached

    monkeypatch.chdir(root)
    monkeypatch.setattr(encoder, "train_alignment", record)
    with pytest.raises(AlignmentReached):
        encoder.main([])
    assert len(seen) == len(captions.dropna()) - 3
    assert not set(seen) & set(test_names)


def test_generator_index_holds_only_the_train_split(tiny_pipeline):
    index, _ = load_index(tiny_pipeline / paths.index_dir(GENERATOR))
    ids = index_ids(index)
    splits = _splits(tiny_pipeline)
    assert sorted(ids.tolist()) == sorted(splits.rows("train").tolist())
    assert not np.isin(ids, np.concatenate([splits.rows("val"), splits.rows("test")])).any()


def test_training_rows_and_their_neighbours_are_train_split_only(tiny_pipeline):
    table = np.load(tiny_pipeline / paths.neighbours_file(GENERATOR))
    train = _splits(tiny_pipeline).rows("train")
    assert sorted(table["rows"].tolist()) == sorted(train.tolist())
    assert np.isin(table["ids"], train).all()


def test_training_refuses_a_neighbour_table_with_held_out_images(tiny_pipeline, tmp_path, monkeypatch):
    root = copy_outputs(tiny_pipeline, tmp_path / "repo", str(paths.INGEST), str(paths.EMBED), str(paths.KNN))
    table_path = root / paths.neighbours_file(GENERATOR)
    table = dict(np.load(table_path))
    test_row = int(_splits(root).rows("test")[0])
    table["rows"][0] = test_row
    with open(table_path, "wb") as fh:
        np.savez(fh, **table)
    monkeypatch.chdir(root)
    with pytest.raises(ValueError, match=f"outside the train split .*row {test_row}"):
        train_continuous.main([])
    assert not paths.CONTINUOUS_MODEL.exists()


def test_eval_prompts_come_from_the_test_split_only(tiny_pipeline):
    splits = _splits(tiny_pipeline)
    captions = splits.read_captions()
    test_names = set(captions.loc[splits.rows("test")].dropna())
    _, prompts = load_text_embeddings(tiny_pipeline / paths.EVAL_PROMPTS)
    template = load_params(tiny_pipeline / "params.yaml").encoder.prompt_template
    assert set(prompts) == {template.format(name=n) for n in test_names if n.strip()}
    train_only = set(captions.loc[splits.rows("train")].dropna()) - test_names
    assert train_only and not {template.format(name=n) for n in train_only} & set(prompts)
