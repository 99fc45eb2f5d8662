"""Benchmarks of engines: measure (:mod:`.measure`), describe the machine (:mod:`.machine`), report as
Markdown (:mod:`.report`) and plots (:mod:`.plots`). ``lowdiff bench`` (lowdiff/cli/commands/bench.py)
is the command line over them; the quality study and the load tests reuse them."""
