# refresher: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= ui_testing
ENGINE ?= auto
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install refresh plan reset status url down test lint format bench mutation gc image up compose-down clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install refresher with its test extras

refresh: $(STAMP) ## Load PROFILE into an isolated Postgres (ENGINE=auto|local|docker) and print its DSN
	$(BIN)/refresher refresh --profile $(PROFILE) --engine $(ENGINE)

plan: $(STAMP) ## Show what a refresh of PROFILE would do, touching nothing
	$(BIN)/refresher plan --profile $(PROFILE) --engine $(ENGINE)

reset: $(STAMP) ## Bring PROFILE's database back to its pristine snapshot
	$(BIN)/refresher reset --profile $(PROFILE)

status: $(STAMP) ## Show the servers refresher runs
	$(BIN)/refresher status

url: $(STAMP) ## Print PROFILE's DSN (with its password)
	@$(BIN)/refresher url --profile $(PROFILE)

down: $(STAMP) ## Stop and remove PROFILE's server (PROFILE=all for every one)
	$(BIN)/refresher down --profile $(PROFILE)

test: $(STAMP) ## Run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check, ruff format --check, mypy strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## Run the benchmarks and write bench/results.md
	$(BIN)/python -m bench --output bench/results.md

mutation: $(STAMP) ## Mutation-test the pure core with mutmut (slow: one niced worker) and write bench/mutation.md
	nice -n 19 $(BIN)/python -m bench.mutation --output bench/mutation.md $(if $(MODULES),--modules $(MODULES))

gc: $(STAMP) ## Garbage-collect the feature store (RETENTION_WEEKS=4)
	$(BIN)/featurestore gc --retention-weeks $(or $(RETENTION_WEEKS),4) --verbose

image: ## Build the air-gapped Postgres image from Debian packages (no registry needed)
	bash compose/image/build.sh

# Compose v2 (`docker compose`) where installed, else Debian's docker-compose v1.
COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

up: ## docker compose up: Postgres and Redis for people who prefer compose
	$(COMPOSE) -f compose/docker-compose.yml up -d

compose-down: ## docker compose down (removes the volumes)
	$(COMPOSE) -f compose/docker-compose.yml down -v

clean: ## Remove .venv and local state (not the feature store)
	rm -rf $(VENV) .refresher
