"""Human-rated sentiment in four domains (Hutto & Gilbert, ICWSM 2014), as binary classification tasks.

The data: snippets of text, each with the mean of about 20 human ratings in [-4, 4] (MIT licence), in the files
`*_GroundTruth.txt` (UTF-8, CRLF lines of `id<TAB>rating<TAB>text`) of `additional_resources/hutto_ICWSM_2014.tar.gz`
inside the source distribution of `vadersentiment==3.3.2` (the wheel lacks them). Four domains:

  domain    file                                  items   kept   positive  negative
  movies    movieReviewSnippets_GroundTruth.txt   10,605  10,070   4,995     5,075   (Pang & Lee, Rotten Tomatoes)
  amazon    amazonReviewSnippets_GroundTruth.txt   3,708   2,977   1,744     1,233
  tweets    tweets_GroundTruth.txt                 4,200   3,432   2,345     1,087
  nyt       nytEditorialSnippets_GroundTruth.txt   5,190   2,931   1,175     1,756

The rule ("kept"): label 1 (positive) if rating > 0, 0 (negative) if rating < 0; items with |rating| < 0.5
(near-neutral, `min_abs_rating`) are dropped; a text seen before in the same domain (after stripping surrounding
whitespace) is dropped too, so no text is both in a train and a test set. Then a seeded train/test split,
stratified by label, per domain.

Fetching. On first use the sdist is downloaded with `python -m pip download --no-binary :all: --no-deps
vadersentiment==3.3.2` (the running interpreter's pip, so the package registry configured for pip), its SHA-256 is
checked against `SDIST_SHA256` (an error names the file and both digests), and the four files are extracted into the
data cache: `cache_dir` if given, else the environment variable BMERGE_DATA_DIR, else
~/.cache/bmerge; later calls read the cache only. `python -m bmerge.io._sentiment` fetches ahead (e.g. at install time,
so tests and experiments need no network).

References:
  Hutto, Gilbert. VADER: a parsimonious rule-based model for sentiment analysis of social media text. ICWSM 2014.
  Pang, Lee. Seeing stars: exploiting class relationships for sentiment categorization with respect to rating
  scales. ACL 2005.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from bmerge import _checks
from bmerge.io._dataset import Dataset

PathLike = Union[str, pathlib.Path]

DOMAINS = ("movies", "amazon", "tweets", "nyt")
FILES = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
REQUIREMENT = "vadersentiment==3.3.2"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"  # vaderSentiment-3.3.2.tar.gz
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
SUBDIR = "hutto_ICWSM_2014"  # the cache's folder for the four files
ENV_VAR = "BMERGE_DATA_DIR"
MIN_ABS_RATING = 0.5


class Items(NamedTuple):
  """One domain's file as parsed, in file order."""

  ids: np.ndarray  # [N] str
  ratings: np.ndarray  # [N] float64, mean human rating in [-4, 4]
  texts: np.ndarray  # [N] str


def data_dir(cache_dir: Optional[PathLike] = None) -> pathlib.Path:
  """The data cache: `cache_dir`, else $BMERGE_DATA_DIR, else ~/.cache/bmerge."""
  if cache_dir is not None:
    return pathlib.Path(cache_dir).expanduser()
  return pathlib.Path(os.environ.get(ENV_VAR) or pathlib.Path.home() / ".cache" / "bmerge").expanduser()


def extract(sdist: PathLike, folder: PathLike) -> pathlib.Path:
  """Extracts the four `*_GroundTruth.txt` files from the vadersentiment sdist (a .tar.gz) into `folder`.

  Only those members are read (by name) and written under fixed names; each file is written whole and then renamed,
  so a cache folder never holds a partial file.
  """
  folder = pathlib.Path(folder)
  with tarfile.open(sdist, "r:gz") as outer:
    inner = [m for m in outer.getmembers() if m.isfile() and m.name.endswith("/" + INNER_ARCHIVE)]
    if len(inner) != 1:
      raise ValueError(f"{str(sdist)!r} must hold exactly one '*/{INNER_ARCHIVE}', found {len(inner)}.")
    blob = outer.extractfile(inner[0]).read()
  with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
    members = {pathlib.PurePosixPath(m.name).name: m for m in archive.getmembers() if m.isfile()}
    missing = [name for name in FILES.values() if name not in members]
    if missing:
      raise ValueError(f"{INNER_ARCHIVE} in {str(sdist)!r} lacks {missing}.")
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
      partial = folder / (name + ".partial")
      partial.write_bytes(archive.extractfile(members[name]).read())
      partial.replace(folder / name)
  return folder


def _pip_download(dest: pathlib.Path) -> pathlib.Path:
  """Downloads the sdist with this interpreter's pip; returns its path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
         REQUIREMENT, "-d", str(dest)]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  archives = sorted(dest.glob("*.tar.gz"))
  if result.returncode != 0 or not archives:
    tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-5:])
    raise RuntimeError(f"Could not download {REQUIREMENT} (the sentiment data ship in its source distribution): "
                       f"`{' '.join(cmd[1:])}` failed (exit {result.returncode}). Is the package registry reachable? "
                       f"pip said:\n{tail}")
  return archives[0]


def fetch(cache_dir: Optional[PathLike] = None) -> pathlib.Path:
  """The folder holding the four ground-truth files, downloading (checked by SHA-256) and extracting them on first
  use."""
  folder = data_dir(cache_dir) / SUBDIR
  if all((folder / name).is_file() for name in FILES.values()):
    return folder
  folder.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
    sdist = _pip_download(pathlib.Path(tmp))
    _checks.sha256(sdist.read_bytes(), SDIST_SHA256, f"The downloaded {REQUIREMENT} archive {sdist.name!r}")
    return extract(sdist, folder)


def parse(text: str, source: str = "text") -> Items:
  """Parses a ground-truth file's text: one `id<TAB>rating<TAB>text` per line (CRLF or LF); blank lines skipped.

  Args:
    text: the file's text.
    source: the file's name, for error messages.

  Returns:
    `Items(ids, ratings, texts)` in file order.

  Example:
    >>> from bmerge.io import _sentiment
    >>> items = _sentiment.parse("1\\t2.5\\tGreat film\\r\\n2\\t-1.0\\tDull\\r\\n")
    >>> items.ids.tolist(), items.ratings.tolist()
    (['1', '2'], [2.5, -1.0])
  """
  ids, ratings, texts = [], [], []
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) != 3:
      raise ValueError(f"{source} line {number}: expected 3 tab-separated fields (id, rating, text), got "
                       f"{len(fields)}: {line[:60]!r}.")
    try:
      rating = float(fields[1])
    except ValueError:
      raise ValueError(f"{source} line {number}: the rating {fields[1]!r} is not a number.") from None
    ids.append(fields[0])
    ratings.append(rating)
    texts.append(fields[2])
  return Items(np.asarray(ids, dtype=str), np.asarray(ratings, np.float64), np.asarray(texts, dtype=str))


def _check_domains(domains) -> tuple[str, ...]:
  domains = DOMAINS if domains is None else ((domains,) if isinstance(domains, str) else tuple(domains))
  bad = [d for d in domains if d not in FILES]
  if bad or not domains:
    raise ValueError(f"`domains` must name domains from {DOMAINS}, got {domains!r}.")
  return domains


def read(domain: str, cache_dir: Optional[PathLike] = None) -> Items:
  """The parsed ground-truth file of one domain (fetched on first use); the file is UTF-8."""
  (domain,) = _check_domains((domain,))
  path = fetch(cache_dir) / FILES[domain]
  return parse(path.read_bytes().decode("utf-8"), str(path))


def binary(items: Items, min_abs_rating: float = MIN_ABS_RATING) -> tuple[np.ndarray, np.ndarray]:
  """(texts [M] str, labels [M] int32): rating > 0 -> 1, < 0 -> 0; |rating| < min_abs_rating and repeated texts
  dropped (first occurrence kept, surrounding whitespace stripped).

  Args:
    items: one domain's parsed file.
    min_abs_rating: items with |rating| below it are dropped (> 0).

  Returns:
    (texts, labels).

  Example:
    >>> from bmerge.io import _sentiment
    >>> items = _sentiment.parse("1\\t2.5\\tGreat\\n2\\t0.2\\tMeh\\n3\\t-3.0\\tBad\\n4\\t1.0\\t Great \\n")
    >>> texts, labels = _sentiment.binary(items)
    >>> texts.tolist(), labels.tolist()                 # 'Meh' is near-neutral, the second 'Great' a repeat
    (['Great', 'Bad'], [1, 0])
  """
  if not isinstance(min_abs_rating, (int, float)) or not min_abs_rating > 0:
    raise ValueError(f"`min_abs_rating` must be > 0 (zero ratings have no label), got {min_abs_rating!r}.")
  texts, labels, seen = [], [], set()
  for rating, text in zip(items.ratings, items.texts):
    text = str(text).strip()
    if abs(rating) < min_abs_rating or text in seen:
      continue
    seen.add(text)
    texts.append(text)
    labels.append(1 if rating > 0 else 0)
  return np.asarray(texts, dtype=str), np.asarray(labels, np.int32)


def load(domains: Union[None, str, Sequence[str]] = None, *, seed: int = 0, test_fraction: float = 0.2,
         min_abs_rating: float = MIN_ABS_RATING, cache_dir: Optional[PathLike] = None) -> dict[str, Dataset]:
  """Binary sentiment tasks, one per domain: {domain: Dataset(train_x, train_y, test_x, test_y, 2)}.

  `*_x` are numpy str arrays of texts (tokenise them with `bmerge.models.bert.tokenize`), `*_y` int32 labels (1
  positive). The split is stratified by label and depends only on `seed`.

  Args:
    domains: a subset of ('movies', 'amazon', 'tweets', 'nyt'); None for all four.
    seed: seed of the train/test split.
    test_fraction: fraction of every domain (and label) held out, in (0, 1).
    min_abs_rating: items with |rating| below it are dropped (default 0.5).
    cache_dir: the data cache (default $BMERGE_DATA_DIR, else ~/.cache/bmerge).

  Returns:
    A dict domain -> `bmerge.data.Dataset`, in the order of `domains`.
  """
  train_test_split = _checks.optional_import("sklearn.model_selection", "experiments", "bmerge.data.load_sentiment",
                                             "scikit-learn").train_test_split

  domains = _check_domains(domains)
  if isinstance(test_fraction, bool) or not isinstance(test_fraction, (float, int)) or not 0 < test_fraction < 1:
    raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
  _checks.integer(seed, "seed", minimum=0)
  out = {}
  for domain in domains:
    texts, labels = binary(read(domain, cache_dir), min_abs_rating)
    train_x, test_x, train_y, test_y = train_test_split(texts, labels, test_size=test_fraction, random_state=int(seed),
                                                        stratify=labels)
    out[domain] = Dataset(train_x, train_y, test_x, test_y, 2)
  return out


def main(argv: Optional[Sequence[str]] = None) -> None:
  """`python -m bmerge.io._sentiment [--cache_dir DIR]`: fetches the data into the cache and prints the counts."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--cache_dir", default=None, help=f"default: ${ENV_VAR}, else ~/.cache/bmerge")
  args = parser.parse_args(argv)
  print(f"sentiment data in {fetch(args.cache_dir)}")
  for domain in DOMAINS:
    items = read(domain, args.cache_dir)
    _, labels = binary(items)
    print(f"  {domain:7s} {len(items.ratings):6d} items, {len(labels):6d} kept: {int(labels.sum()):5d} positive, "
          f"{int((labels == 0).sum()):5d} negative")


if __name__ == "__main__":
  main()
