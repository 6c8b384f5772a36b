"""Sample-quality metrics: FID and Inception Score with the paper's protocol (docs/FID.md).

`fid` holds the math and the statistics files (no network), `inception` the Inception-v3 of the
protocol (torch-fidelity's, weights checked, never downloaded), `evaluate` the streams and the
reports behind `ddpm fid-ref`, `ddpm fid`, `ddpm eval` and FID during training. torch-fidelity is
imported only when a network is built.
"""

from .evaluate import (ArraySource, FolderSource, NpzSource, TrainingFID, evaluate_run, fid_report,
                       measure, open_images, reference_stats, samples_stats)
from .fid import (FeatureStats, FIDStats, ISStats, fid_from_stats, frechet_distance, inception_score, load_stats,
                  save_stats)
from .inception import (WEIGHTS_ENV, WEIGHTS_NAME, WEIGHTS_SHA256_PREFIX, WEIGHTS_URL, InceptionV3, file_sha256,
                        load_inception, resolve_weights_path, tf1_resize_bilinear, write_random_weights)

__all__ = [
    "ArraySource", "FolderSource", "NpzSource", "TrainingFID", "evaluate_run", "fid_report", "measure",
    "open_images", "reference_stats", "samples_stats", "FeatureStats", "FIDStats", "ISStats", "fid_from_stats",
    "frechet_distance", "inception_score", "load_stats", "save_stats", "WEIGHTS_ENV", "WEIGHTS_NAME",
    "WEIGHTS_SHA256_PREFIX", "WEIGHTS_URL", "InceptionV3", "file_sha256", "load_inception", "resolve_weights_path",
    "tf1_resize_bilinear", "write_random_weights",
]
