"""Throughput of the sample-quality metrics: Inception feature extraction and precision / recall.

Run from the checkout's root (``tools/`` is not installed with the package):

    python -m tools.benchmark_metrics --what=all --images=256 --pr_size=10000
    python -m tools.benchmark_metrics --what=pr --pr_size=10000 \\
        --evaluator=/path/to/guided-diffusion/evaluations/evaluator.py

* features: images per second through the Inception graph (64x64 uint8 inputs, resized to 299
  inside the graph, batch ``--batch``), after one warm-up batch; with ``--evaluator``, also the
  evaluator's own ``compute_activations`` on the same graph and images.  With ``--inception=PATH`` the
  real ``classify_image_graph_def.pb``; otherwise a stand-in with the same architecture and cost:
  Keras' InceptionV3 (random weights) frozen into a GraphDef with the evaluator's tensor names.
* pr: :func:`tf_iddpm.metrics.precision_recall` on ``--pr_size`` x ``--pr_size`` random 2048-d
  features (k = 3: two k-NN radius passes plus the cross pass), wall time.  With ``--evaluator``
  the guided-diffusion evaluator's own ``ManifoldEstimator`` runs on the same features in a
  ``tf.compat.v1`` session, and both results are printed (they must agree).

Output: a table and one JSON line.  Timings only; nothing here is asserted.
"""

import argparse
import importlib.util
import json
import sys
import time

import numpy as np
import tensorflow as tf

from tf_iddpm import metrics


def inception_v3_stand_in_graph_def():
    """Keras InceptionV3 (random weights) as a frozen GraphDef with the evaluator's tensor names."""
    import keras  # pylint: disable=g-import-not-at-top
    from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-direct-tensorflow-import

    keras.utils.set_random_seed(0)
    base = keras.applications.InceptionV3(weights=None, include_top=False)
    body = keras.Model(base.input, [base.get_layer("mixed6").output, base.output])
    weights = tf.constant(np.random.default_rng(0).normal(0, 0.02, [2048, 1008]), tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def forward(images):
        images = tf.identity(images, name="ExpandDims")
        resized = tf.image.resize(images, [299, 299]) / 127.5 - 1.0
        mixed, last = body(resized, training=False)
        spatial = tf.identity(mixed, name="mixed_6/conv")
        pool = tf.identity(tf.reduce_mean(last, axis=[1, 2], keepdims=True), name="pool_3")
        logits = tf.matmul(tf.reshape(pool, [-1, 2048]), weights, name="softmax/logits/MatMul")
        return spatial, pool, logits  # outputs, so that freezing keeps the named nodes

    frozen = convert_to_constants.convert_variables_to_constants_v2(forward.get_concrete_function())
    return frozen.graph.as_graph_def()


def _load_evaluator(path: str):
    if not hasattr(np, "bool"):  # removed in numpy 1.24; the evaluator still uses np.bool
        np.bool = bool
    spec = importlib.util.spec_from_file_location("guided_diffusion_evaluator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _evaluator_features(path: str, inception: str, images: np.ndarray, batch: int) -> float:
    """Seconds the evaluator's own compute_activations takes on the same graph and images."""
    module = _load_evaluator(path)
    module.INCEPTION_V3_PATH = inception  # its download step is skipped for an existing file
    session = tf.compat.v1.Session(graph=tf.Graph())
    evaluator = module.Evaluator(session, batch_size=batch)
    evaluator.compute_activations([images[:batch]])  # warm-up
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    start = time.perf_counter()
    evaluator.compute_activations(batches)
    return time.perf_counter() - start


def bench_features(
    inception: str, num_images: int, batch: int, tmp_dir: str, evaluator: str = ""
) -> dict:
    built = not inception
    if built:
        inception = f"{tmp_dir}/inception_v3_stand_in.pb"
        with open(inception, "wb") as f:
            f.write(inception_v3_stand_in_graph_def().SerializeToString())
    graph = metrics.InceptionGraph(inception, batch_size=batch, progress=False)
    images = np.random.default_rng(0).integers(0, 256, [num_images, 64, 64, 3]).astype(np.uint8)
    graph(images[:batch])  # warm-up: tracing, first batch
    start = time.perf_counter()
    graph(images)
    seconds = time.perf_counter() - start
    result = {
        "features_img_per_s": num_images / seconds,
        "features_seconds": seconds,
        "features_images": num_images,
        "features_graph": "InceptionV3 stand-in" if built else "given",
    }
    if evaluator:
        result["ref_features_img_per_s"] = num_images / _evaluator_features(
            evaluator, inception, images, batch
        )
    return result


def _evaluator_pr(path: str, ref: np.ndarray, sample: np.ndarray):
    """The evaluator's ManifoldEstimator on the same features (imported from outside the repo)."""
    module = _load_evaluator(path)
    session = tf.compat.v1.Session(graph=tf.Graph())
    estimator = module.ManifoldEstimator(session)
    start = time.perf_counter()
    radii_ref = estimator.manifold_radii(ref)
    radii_sample = estimator.manifold_radii(sample)
    precision, recall = estimator.evaluate_pr(ref, radii_ref, sample, radii_sample)
    return float(precision[0]), float(recall[0]), time.perf_counter() - start


def bench_pr(size: int, dim: int, evaluator: str) -> dict:
    rng = np.random.default_rng(1)
    ref = np.abs(rng.normal(0, 1, [size, dim])).astype(np.float32)
    sample = np.abs(rng.normal(0.1, 1, [size, dim])).astype(np.float32)
    metrics.precision_recall(ref[:64], sample[:64])  # warm-up: tracing
    start = time.perf_counter()
    precision, recall = metrics.precision_recall(ref, sample)
    result = {
        "pr_size": size,
        "pr_dim": dim,
        "pr_seconds": time.perf_counter() - start,
        "pr_precision": precision,
        "pr_recall": recall,
    }
    if evaluator:
        ref_precision, ref_recall, seconds = _evaluator_pr(evaluator, ref, sample)
        result.update(
            ref_pr_seconds=seconds, ref_pr_precision=ref_precision, ref_pr_recall=ref_recall
        )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.benchmark_metrics", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--what", choices=["features", "pr", "all"], default="all")
    parser.add_argument(
        "--inception",
        default="",
        help="classify_image_graph_def.pb (default: an InceptionV3 stand-in of the same cost)",
    )
    parser.add_argument("--images", type=int, default=256, help="images for the feature pass")
    parser.add_argument("--batch", type=int, default=64, help="images per forward pass")
    parser.add_argument("--pr_size", type=int, default=10_000, help="N for N x N precision/recall")
    parser.add_argument("--pr_dim", type=int, default=2048)
    parser.add_argument(
        "--evaluator",
        default="",
        help="path of guided-diffusion's "
        "evaluations/evaluator.py, to time its precision/recall too",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="TF intra/inter-op threads (0: TF default)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import tempfile  # pylint: disable=g-import-not-at-top

    result = {"device": tf.config.list_physical_devices("GPU") and "GPU" or "CPU"}
    with tempfile.TemporaryDirectory() as tmp_dir:
        if args.what in ("features", "all"):
            result.update(
                bench_features(args.inception, args.images, args.batch, tmp_dir, args.evaluator)
            )
        if args.what in ("pr", "all"):
            result.update(bench_pr(args.pr_size, args.pr_dim, args.evaluator))
    rows = []
    if "features_img_per_s" in result:
        rows.append(
            (
                f"Inception features ({result['features_graph']}, {args.images} imgs, "
                f"batch {args.batch})",
                f"{result['features_img_per_s']:.1f} img/s",
                f"{result['ref_features_img_per_s']:.1f} img/s"
                if "ref_features_img_per_s" in result
                else "-",
            )
        )
    if "pr_seconds" in result:
        evaluator = (
            f"{result['ref_pr_seconds']:.1f} s (P {result['ref_pr_precision']:.4f}, "
            f"R {result['ref_pr_recall']:.4f})"
            if "ref_pr_seconds" in result
            else "-"
        )
        rows.append(
            (
                f"precision/recall {args.pr_size} x {args.pr_size} x {args.pr_dim}",
                f"{result['pr_seconds']:.1f} s (P {result['pr_precision']:.4f}, "
                f"R {result['pr_recall']:.4f})",
                evaluator,
            )
        )
    print(f"| measurement ({result['device']}) | tf_iddpm | guided-diffusion evaluator |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
