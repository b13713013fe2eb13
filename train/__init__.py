"""One period of continual training on DeepSpeed: model, data, loop, export, evaluation."""
