# `make demo` and `make test` each create .venv when it is missing and install what they need.
# TORCH_PIN pins the torch build that this project's machines carry on disk; elsewhere
# `make TORCH_PIN=` lets pip pick any torch that pyproject.toml admits.
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.fxgndi-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(if $(strip $(TORCH_PIN)),$(VENV)/bin/pip install -q $(TORCH_PIN))
	$(VENV)/bin/pip install -q -e '.[test,figures,onnx]'
	$(VENV)/bin/python -c "import torch; print('fxgndi: installed torch', torch.__version__, \
	    '(CUDA available)' if torch.cuda.is_available() else '(CPU: no CUDA device)')"
	touch $(STAMP)

# The demo keeps what it makes in $(DEMO_OUT)/ (pruned models, figures, demo.txt, demo.md);
# its machine-independent tables become docs/demo.md, whose blocks the README quotes.
DEMO_OUT ?= demo-out

demo: $(STAMP)
	$(VENV)/bin/fxgndi demo --out $(DEMO_OUT)
	cp $(DEMO_OUT)/demo.md docs/demo.md
	$(VENV)/bin/python scripts/quote_demo.py docs/demo.md README.md

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m flake8 fxgndi tests benchmarks scripts
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/scoring_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
