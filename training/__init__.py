"""Bradley-Terry training and evaluation of reward-model ensembles (docs/training.md).

Entry points: `rmserve.training.trainer.train(TrainConfig(...), progress=, should_stop=)`,
`rmserve.training.evaluate.evaluate(model_dir, data)`, and the CLI wiring in
`rmserve.training.cli`. Nothing is imported here, so `import rmserve.training`
stays cheap.
"""
