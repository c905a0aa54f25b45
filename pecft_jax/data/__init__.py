"""Data: offline readers, continual scenarios, deterministic host-side batching read by grain."""
from pecft_jax.data.loader import ReadOptions
from pecft_jax.data.pipeline import (Preprocess, StreamBatches, TrainBatches, epoch_permutation,
                                     eval_batches, num_eval_batches, preprocess_images,
                                     steps_per_epoch, train_batches)
from pecft_jax.data.scenarios import (Scenario, Task, build_scenario, class_incremental,
                                      domain_incremental, parse_domain_spec, resolve_class_order,
                                      task_incremental, task_sizes)
from pecft_jax.data.sources import (ArraySource, FolderSource, ImageSource, TFDSSource,
                                    TransformedSource, get_domain_transform, load_source,
                                    read_idx, resize_bilinear, scan_image_folder,
                                    stratified_split)

__all__ = [
    "ArraySource", "FolderSource", "ImageSource", "Preprocess", "ReadOptions", "Scenario",
    "StreamBatches", "TFDSSource", "Task", "TrainBatches", "TransformedSource",
    "build_scenario", "class_incremental", "domain_incremental", "epoch_permutation",
    "eval_batches", "get_domain_transform", "load_source", "num_eval_batches",
    "parse_domain_spec", "preprocess_images", "read_idx", "resize_bilinear",
    "resolve_class_order", "scan_image_folder", "stratified_split", "steps_per_epoch",
    "task_incremental", "task_sizes", "train_batches",
]
