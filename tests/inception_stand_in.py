"""A tiny stand-in for the 2015 Inception graph, with the tensor names the evaluator reads.

``classify_image_graph_def.pb`` (about 90 MB) cannot be downloaded in tests.  This graph has the
same interface: images enter at ``ExpandDims:0`` (float32 [N, H, W, 3] in [0, 255]); it resizes
them to 16 x 16 (the real one: 299 x 299), scales them, and computes ``mixed_6/conv`` [N, 8, 8, 8]
(>= 7 channels), ``pool_3`` [N, 1, 1, 2048] and ``softmax/logits/MatMul`` (pool [N, 2048] times a
[2048, 1008] weight constant), followed by a bias and ``softmax``.  Fixed random weights (seed),
so features are a deterministic, non-degenerate function of the images.

Like the real graph, it normalises with ``BatchNormWithGlobalNormalization`` (an op removed from
GraphDefs newer than version 9, which TF2 functions refuse) and declares an old producer version:
a plain ``tf.compat.v1.Session`` runs it natively, and the loader under test must rewrite it.

``pool_dim`` < 2048 makes a faster variant for end-to-end tests: FID's matrix square root of a
2048 x 2048 product takes tens of seconds on a busy CPU, and the loader does not depend on it.
"""

import numpy as np
import tensorflow as tf

POOL_DIM = 2048
NUM_CLASSES = 1008


def make_graph_def(seed: int = 0, pool_dim: int = POOL_DIM):
    """The stand-in graph as a tf.compat.v1.GraphDef."""
    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    with graph.as_default():
        # As in the real graph, ExpandDims turns one decoded image [H, W, 3] into a batch of one.
        decoded = tf.compat.v1.placeholder(tf.float32, [None, None, 3], name="DecodeJpeg")
        images = tf.expand_dims(decoded, 0, name="ExpandDims")
        resized = tf.image.resize(images, [16, 16])
        scaled = (resized - 128.0) / 128.0
        conv0 = tf.nn.conv2d(
            scaled, tf.constant(rng.normal(0, 0.5, [3, 3, 3, 16]).astype(np.float32)), 1, "SAME"
        )
        moments = [
            tf.constant(value.astype(np.float32), name=f"conv0/{name}")
            for name, value in (
                ("mean", rng.normal(0, 0.2, 16)),
                ("variance", rng.uniform(0.5, 2.0, 16)),
                ("beta", rng.normal(0, 0.1, 16)),
                ("gamma", rng.uniform(0.5, 1.5, 16)),
            )
        ]
        # A placeholder op, turned into BatchNormWithGlobalNormalization in the GraphDef below.
        normalized = tf.identity(conv0, name="conv0/batchnorm")
        conv1 = tf.nn.relu(normalized)
        spatial = tf.nn.conv2d(
            conv1,
            tf.constant(rng.normal(0, 0.3, [3, 3, 16, 8]).astype(np.float32)),
            2,
            "SAME",
            name="mixed_6/conv",
        )
        hidden = tf.nn.relu(spatial)
        pooled = tf.reduce_mean(hidden, axis=[1, 2], keepdims=True)
        features = tf.concat([pooled, tf.reduce_max(hidden, axis=[1, 2], keepdims=True)], -1)
        projection = tf.constant(rng.normal(0, 1.0, [1, 1, 16, pool_dim]).astype(np.float32))
        pool = tf.nn.relu(tf.nn.conv2d(features, projection, 1, "VALID") + 0.1, name="pool_3")
        flat = tf.reshape(pool, [-1, pool_dim], name="pool_3/_reshape")
        weights = tf.constant(
            rng.normal(0, 0.05, [pool_dim, NUM_CLASSES]).astype(np.float32), name="softmax/weights"
        )
        logits = tf.matmul(flat, weights, name="softmax/logits/MatMul")
        tf.nn.softmax(logits + 0.01, name="softmax")
    graph_def = graph.as_graph_def()
    for node in graph_def.node:
        if node.name == "conv0/batchnorm":
            node.op = "BatchNormWithGlobalNormalization"
            del node.input[:]
            node.input.extend([conv0.op.name] + [m.op.name for m in moments])
            node.attr["variance_epsilon"].f = 1e-3
            node.attr["scale_after_normalization"].b = True
    graph_def.versions.producer = 5  # the 2015 graph's era: before the op was removed (9)
    return graph_def


def write(path, seed: int = 0, pool_dim: int = POOL_DIM) -> str:
    """Writes the stand-in graph to ``path`` (a .pb file) and returns the path."""
    with open(path, "wb") as f:
        f.write(make_graph_def(seed, pool_dim).SerializeToString())
    return str(path)


def reference_features(graph_def, images):
    """The stand-in's pool_3, mixed_6/conv[..., :7] and softmax outputs for images, one by one,
    through a plain tf.compat.v1 session fed at DecodeJpeg (as the graph was built, independent of
    the loader under test)."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    pools, spatials, probs = [], [], []
    with tf.compat.v1.Session(graph=graph) as session:
        for image in np.asarray(images, np.float32):
            pool, spatial, logits = session.run(
                ["pool_3:0", "mixed_6/conv:0", "softmax/logits/MatMul:0"], {"DecodeJpeg:0": image}
            )
            pools.append(pool.reshape(-1))
            spatials.append(spatial[..., :7].reshape(-1))
            shifted = logits - logits.max(axis=1, keepdims=True)
            probs.append((np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True))[0])
    return {"pool": np.stack(pools), "spatial": np.stack(spatials), "probs": np.stack(probs)}
