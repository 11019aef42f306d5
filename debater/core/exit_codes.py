"""Exit codes that mean more than success or failure, defined once for Python and the launch scripts, which read
them with ``python3 -c 'from debater.core.exit_codes import STOPPED_EARLY; print(STOPPED_EARLY)'`` (this module
imports nothing, so that costs no torch import)."""

# sysexits.h's EX_TEMPFAIL ("temporary failure, try again"): not 0 (finished), 1 (error), 2 (usage error), nor
# 128+N (killed by signal N, e.g. 137, 143), so a wrapper cannot take a crash for a resumable stop
STOPPED_EARLY = 75
