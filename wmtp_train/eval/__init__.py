"""Evaluation: HumanEval pass@k, the critic report, their statistics, and run comparison."""
