# rtdmd-bench: two commands do all the set-up.
#   make demo   install, then the main job on the embedded default (quick RTDMD run, evaluation, report)
#   make test   install, then the whole test suite
# Variables: PYTHON (interpreter for the venv), VENV (its directory), TORCH (the torch requirement
# installed first), TORCH_PIP_ARGS (e.g. --index-url https://download.pytorch.org/whl/cu128).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo
DEMO_EXPERIMENT ?= demo
DEMO_PROMPTS ?= 48

.PHONY: install test demo clean-demo

# torch first, so that the project's `torch>=2.4` is already satisfied by the CPU build and pip
# does not pull a CUDA build (GPU users pass their CUDA build in TORCH / TORCH_PIP_ARGS).
# clean-fid goes in without its dependencies: it declares torchvision, which the parts we use
# (Inception torchscript, the clean resize) never import, and which would pin another torch.
# The stamp makes a second `make` skip the install; it is redone when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps 'clean-fid>=0.1.35'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest

# The main job: RTDMD's quick schedule on the shapes world (stage 1 AC-DMD, stage 2 RTDMD),
# then GenEval-shapes, preference (oracle + learned) and aesthetic scores of its 4-step
# generator beside the shipped teacher (28 steps, CFG 4) on the same prompts, then the report.
demo: install
	$(BIN)/rtdmd-bench train rtdmd --preset quick --out $(DEMO_OUT)/rtdmd --resume-if-exists \
		--set tracking.experiment=$(DEMO_EXPERIMENT)
	$(BIN)/rtdmd-bench eval --suite all --experiment $(DEMO_EXPERIMENT) --max-prompts $(DEMO_PROMPTS) \
		--checkpoint $(DEMO_OUT)/rtdmd --steps 4 --out $(DEMO_OUT)/eval
	$(BIN)/rtdmd-bench eval --suite all --experiment $(DEMO_EXPERIMENT) --max-prompts $(DEMO_PROMPTS) \
		--checkpoint rtdmd/assets/shapes_teacher --steps 28 --guidance 4 --out $(DEMO_OUT)/eval
	$(BIN)/rtdmd-bench report --experiment $(DEMO_EXPERIMENT) --out reports/$(DEMO_EXPERIMENT)/report.md
	@echo "Done. Open the report: reports/$(DEMO_EXPERIMENT)/report.md"
	@echo "MLflow experiment '$(DEMO_EXPERIMENT)': $(BIN)/rtdmd-bench report --experiment $(DEMO_EXPERIMENT), or $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db"

clean-demo:
	rm -rf $(DEMO_OUT) reports/$(DEMO_EXPERIMENT)
