"""The sentiment data (bmerge.io._sentiment via bmerge.data.load_sentiment): the sdist's archive-in-archive, the parser,
the labelling rule, the split, the cache, the pip error; the real counts when the data are cached."""

import hashlib
import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from bmerge.io import _sentiment
from bmerge import data

# Per domain: (rating, text) lines; the rule keeps |rating| >= 0.5 and the first of repeated texts.
LINES = [
    (2.5, "A wonderful, moving film."),
    (-1.75, "Dull and far too long."),
    (0.3, "It exists."),  # near-neutral: dropped
    (-0.49, "Hmm."),  # near-neutral: dropped
    (0.5, "Café crème — quite nice."),  # boundary: kept, positive; UTF-8
    (-0.5, "  Not for me.  "),  # boundary: kept, negative; surrounding spaces stripped
    (3.0, "A wonderful, moving film."),  # repeated text: dropped
    (0.0, "Neutral."),  # dropped
]


def _ground_truth(domain: str, extra: int) -> bytes:
  rng = np.random.default_rng(len(domain))
  rows = LINES + [(float(np.round(rng.choice([-1, 1]) * rng.uniform(0.6, 3.9), 3)), f"{domain} text {i}")
                  for i in range(extra)]
  return "".join(f"{i + 1}\t{r}\t{t}\r\n" for i, (r, t) in enumerate(rows)).encode("utf-8")


def _tar_gz(members: dict) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return buffer.getvalue()


@pytest.fixture
def sdist(tmp_path):
  """A miniature vaderSentiment-3.3.2.tar.gz: the ground truth inside additional_resources/hutto_ICWSM_2014.tar.gz."""
  inner = _tar_gz({f"hutto_ICWSM_2014/{name}": _ground_truth(domain, 40) for domain, name in _sentiment.FILES.items()}
                  | {"hutto_ICWSM_2014/_README_.txt": b"readme"})
  path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
  path.write_bytes(_tar_gz({"vaderSentiment-3.3.2/setup.py": b"", f"vaderSentiment-3.3.2/{_sentiment.INNER_ARCHIVE}":
                            inner}))
  return path


@pytest.fixture
def fake_pip(monkeypatch, sdist):
  """Replaces the download with a copy of the miniature sdist; counts the downloads."""
  calls = []

  def download(dest):
    calls.append(dest)
    target = dest / sdist.name
    target.write_bytes(sdist.read_bytes())
    return target

  monkeypatch.setattr(_sentiment, "_pip_download", download)
  monkeypatch.setattr(_sentiment, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
  return calls


def test_rule_parser_and_cache_on_a_miniature_sdist(tmp_path, fake_pip):
  tasks = data.load_sentiment(cache_dir=tmp_path / "cache", test_fraction=0.25)
  assert list(tasks) == list(_sentiment.DOMAINS) and len(fake_pip) == 1
  for domain, ds in tasks.items():
    texts = np.concatenate([ds.train_x, ds.test_x])
    labels = dict(zip(texts, np.concatenate([ds.train_y, ds.test_y])))
    assert ds.num_classes == 2 and ds.train_y.dtype == np.int32 and len(texts) == 4 + 40 == len(set(texts))
    assert labels["A wonderful, moving film."] == 1 and labels["Dull and far too long."] == 0
    assert labels["Café crème — quite nice."] == 1 and labels["Not for me."] == 0
    assert not {"It exists.", "Hmm.", "Neutral."} & set(texts)
  # Cached: a second call (another domain order, another seed) downloads nothing.
  again = data.load_sentiment(["nyt", "movies"], cache_dir=tmp_path / "cache", seed=1)
  assert list(again) == ["nyt", "movies"] and len(fake_pip) == 1
  assert (tmp_path / "cache" / _sentiment.SUBDIR / "tweets_GroundTruth.txt").is_file()
  items = _sentiment.read("movies", tmp_path / "cache")
  assert items.ids[0] == "1" and items.ratings[3] == -0.49 and items.texts[5] == "  Not for me.  "
  assert len(items.ratings) == len(LINES) + 40


def test_split_is_stratified_seeded_and_disjoint(tmp_path, fake_pip):
  a = data.load_sentiment("tweets", cache_dir=tmp_path, seed=3, test_fraction=0.25)["tweets"]
  b = data.load_sentiment("tweets", cache_dir=tmp_path, seed=3, test_fraction=0.25)["tweets"]
  c = data.load_sentiment("tweets", cache_dir=tmp_path, seed=4, test_fraction=0.25)["tweets"]
  np.testing.assert_array_equal(a.test_x, b.test_x)
  assert set(a.test_x) != set(c.test_x)
  assert not set(a.train_x) & set(a.test_x) and len(a.test_x) == 11
  assert abs(a.test_y.mean() - a.train_y.mean()) < 0.1  # stratified by label


def test_environment_variable_sets_the_cache(tmp_path, fake_pip, monkeypatch):
  monkeypatch.setenv(_sentiment.ENV_VAR, str(tmp_path / "env"))
  assert _sentiment.data_dir() == tmp_path / "env"
  data.load_sentiment("amazon")
  assert (tmp_path / "env" / _sentiment.SUBDIR / "amazonReviewSnippets_GroundTruth.txt").is_file()
  assert _sentiment.data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_a_download_with_another_sha256_is_refused_and_nothing_is_cached(tmp_path, fake_pip, sdist, monkeypatch):
  monkeypatch.setattr(_sentiment, "SDIST_SHA256", "0" * 64)
  actual = hashlib.sha256(sdist.read_bytes()).hexdigest()
  with pytest.raises(ValueError, match=rf"vaderSentiment-3\.3\.2\.tar\.gz'? has SHA-256 {actual}, expected 0{{64}}"):
    data.load_sentiment("nyt", cache_dir=tmp_path)
  assert len(fake_pip) == 1 and not (tmp_path / _sentiment.SUBDIR).exists()


def test_pip_is_run_for_the_sdist_and_its_failure_is_a_clear_error(tmp_path, monkeypatch):
  seen = []

  def run(cmd, **kwargs):
    seen.append(cmd)
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

  monkeypatch.setattr(subprocess, "run", run)
  with pytest.raises(RuntimeError, match="(?s)registry reachable.*Could not find a version"):
    data.load_sentiment("nyt", cache_dir=tmp_path)
  assert seen[0][:3] == [sys.executable, "-m", "pip"]
  assert {"download", "--no-binary", ":all:", "--no-deps", "vadersentiment==3.3.2"} <= set(seen[0])
  assert not (tmp_path / _sentiment.SUBDIR).exists()  # nothing half-made is left as the cache


def test_arguments_and_malformed_files_are_errors(tmp_path, sdist):
  with pytest.raises(ValueError, match="domains"):
    data.load_sentiment(["imdb"], cache_dir=tmp_path)
  with pytest.raises(ValueError, match="test_fraction"):
    data.load_sentiment("nyt", cache_dir=tmp_path, test_fraction=1.0)
  with pytest.raises(ValueError, match=r"line 2: expected 3 tab-separated"):
    _sentiment.parse("1\t0.5\tgood\r\n2\t0.7\n", "f.txt")
  with pytest.raises(ValueError, match=r"line 1: the rating 'x'"):
    _sentiment.parse("1\tx\tgood\n")
  with pytest.raises(ValueError, match="min_abs_rating"):
    _sentiment.binary(_sentiment.parse("1\t0.5\tgood\n"), 0.0)
  broken = tmp_path / "broken.tar.gz"
  broken.write_bytes(_tar_gz({"x/setup.py": b""}))
  with pytest.raises(ValueError, match="hutto_ICWSM_2014.tar.gz"):
    _sentiment.extract(broken, tmp_path / "out")
  assert _sentiment.extract(sdist, tmp_path / "ok") == tmp_path / "ok"


REAL = _sentiment.data_dir() / _sentiment.SUBDIR


@pytest.mark.shipped_data(not all((REAL / n).is_file() for n in _sentiment.FILES.values()),
                           reason=f"the sentiment data are not cached in {REAL} (`python -m bmerge.io._sentiment`)")
def test_real_data_counts_are_those_of_the_docstring():
  expect = {"movies": (10605, 4995, 5075), "amazon": (3708, 1744, 1233), "tweets": (4200, 2345, 1087),
            "nyt": (5190, 1175, 1756)}
  for domain, (items, positive, negative) in expect.items():
    parsed = _sentiment.read(domain)
    texts, labels = _sentiment.binary(parsed)
    assert (len(parsed.ratings), int(labels.sum()), int((labels == 0).sum())) == (items, positive, negative)
    assert np.all(np.abs(parsed.ratings) <= 4)
  movies = data.load_sentiment("movies")["movies"]
  assert (len(movies.train_x), len(movies.test_x)) == (8056, 2014)
  assert any("é" in t for t in movies.train_x)  # UTF-8 decoded, not mojibake
