"""Named scenarios, the simulation launcher (`privfed simulate`) and benchmarks."""
