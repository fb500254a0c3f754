#!/usr/bin/env bash
# The version-sensitive tests under other transformers versions, each in a throwaway venv:
#
#   scripts/check_versions.sh                  # the versions requirements.txt says were tested
#   scripts/check_versions.sh 5.26.0           # the next release, before widening the range
#   PYTEST_ARGS="tests/test_contracts.py -q" scripts/check_versions.sh 5.26.0   # only the contracts
#
# Each venv gets requirements-lock.txt, then transformers==VERSION with whatever that version itself
# needs (pip resolves it). The tests: tests/test_contracts.py (every internal the project relies on,
# one test each) and the fast loop (-m "not slow"), about 4 minutes a version on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
    read -r -a versions <<< "$(sed -n 's/^transformers[^#]*# tested: \([0-9.]*\) and \([0-9.]*\).*/\1 \2/p' \
        requirements.txt)"
fi
[ ${#versions[@]} -gt 0 ] || { echo "error: no versions given and none found in requirements.txt" >&2; exit 2; }
args=${PYTEST_ARGS:-"tests -q -m 'not slow' -n 2 -p no:cacheprovider"}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
status=0
for v in "${versions[@]}"; do
    venv=$(mktemp -d)/venv
    echo "== transformers $v ($venv)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip 2>/dev/null
    "$venv/bin/pip" install -q --no-deps -r requirements-lock.txt
    if ! "$venv/bin/pip" install -q "transformers==$v"; then
        echo "== transformers $v: could not be installed"; status=1; continue
    fi
    "$venv/bin/python" -c "import transformers, peft, torch; print('transformers', transformers.__version__, \
'peft', peft.__version__, 'torch', torch.__version__)"
    if eval "\"$venv/bin/python\" -m pytest $args"; then
        echo "== transformers $v: passed"
    else
        echo "== transformers $v: FAILED"; status=1
    fi
    rm -rf "$(dirname "$venv")"
done
exit $status
