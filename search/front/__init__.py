"""The front a search gives: Pareto ranks, the front's trials and the base trial, confirmation, fidelity, the
printed report and the exported files."""
