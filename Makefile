# refresher: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= ui_testing
# Empty: the CLI's own choice ($REFRESHER_ENGINE, else auto), so `make refresh` and `refresher refresh` agree.
ENGINE ?=
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install refresh plan reset status url down test lint format bench mutation gc image up compose-ps compose-down clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# pip's full output is hundreds of lines; -q is a minute of silence. Show one line per package it fetches.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== installing refresher and its test extras into $(VENV) (about a minute the first time)"
	@$(BIN)/python -m pip install -q --upgrade pip
	@set -o pipefail; $(BIN)/python -m pip install -e '.[test]' 2>&1 \
		| { grep --line-buffered -E '^(Collecting|Successfully installed|ERROR|error)' || true; } | cut -c1-120
	@touch $(STAMP)
	@echo "== done: the CLI is $(CURDIR)/$(BIN)/refresher (source $(BIN)/activate to put it on your PATH)"

install: $(STAMP) ## Create .venv and install refresher with its test extras

refresh: $(STAMP) ## Load PROFILE into an isolated Postgres (ENGINE=auto|local|docker|compose, default $REFRESHER_ENGINE, else auto; AS_OF=date) and print its DSN
	$(BIN)/refresher refresh --profile $(PROFILE) $(if $(ENGINE),--engine $(ENGINE)) $(if $(AS_OF),--as-of $(AS_OF))

plan: $(STAMP) ## Show what a refresh of PROFILE would do, touching nothing
	$(BIN)/refresher plan --profile $(PROFILE) $(if $(ENGINE),--engine $(ENGINE)) $(if $(AS_OF),--as-of $(AS_OF))

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
	@$(BIN)/python -c 'import pytest_postgresql, taskiq_redis' 2>/dev/null || $(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench --output bench/results.md

mutation: $(STAMP) ## Mutation-test the pure core with mutmut (slow: one niced worker) and write bench/mutation.md
	nice -n 19 $(BIN)/python -m bench.mutation --output bench/mutation.md $(if $(MODULES),--modules $(MODULES))

gc: $(STAMP) ## Garbage-collect the feature store (RETENTION_WEEKS=4)
	$(BIN)/featurestore gc --retention-weeks $(or $(RETENTION_WEEKS),4) --verbose

image: ## Build the air-gapped images (refresher/postgres:15, refresher/redis:7; WITH_REDIS=0: Postgres only)
	WITH_REDIS=$(or $(WITH_REDIS),1) bash compose/image/build.sh

# Compose v2 (`docker compose`) where installed, else Debian's docker-compose v1; empty when neither is.
COMPOSE := $(shell if docker compose version >/dev/null 2>&1; then echo "docker compose"; \
	elif command -v docker-compose >/dev/null 2>&1; then echo docker-compose; fi)
# One project per checkout (refresher computes the same name for --engine compose): checkouts sharing a Docker
# daemon never touch each other's services. The shell's `pwd -P`, as Python's Path.resolve(): make's $(realpath)
# splits a path holding spaces into words, and every such checkout hashed "" into one shared project.
COMPOSE_PROJECT ?= refresher-$(shell printf '%s' "$$(pwd -P)" | sha256sum | cut -c1-10)
NO_COMPOSE := no Docker Compose found: install one (Debian: apt-get install docker-compose; or Docker's compose plugin)
COMPOSE_SH = $(if $(COMPOSE),COMPOSE='$(COMPOSE)' COMPOSE_PROJECT=$(COMPOSE_PROJECT) bash compose/compose.sh,$(error $(NO_COMPOSE)))

up: ## Start Postgres and Redis with compose (builds missing images offline; refresher --engine compose uses them)
	@$(COMPOSE_SH) up

compose-ps: ## Show where this checkout's compose Postgres and Redis listen
	@$(COMPOSE_SH) ps

compose-down: ## Stop this checkout's compose services and remove their volumes
	@$(COMPOSE_SH) down

clean: ## Remove .venv and local state (not the feature store)
	rm -rf $(VENV) .refresher
