"""Base configuration shared by every experiment.

Each experiment file (``configs/<name>.py``) imports :func:`get_config` from here (or from another
experiment) and sets only the fields whose values differ; nothing is copied, not even a value equal
to the default (``tests/configs_test.py`` checks both).  Every field can be overridden on the
command line, e.g. ``--config.train.batch_size=64``.  Field names follow openai/improved-diffusion's
``script_util`` argument names so a reference command line maps 1:1:

* ``config.model`` holds exactly the keyword arguments of :func:`tf_iddpm.factory.create_model`
    (except ``image_size``, ``learn_sigma`` and ``class_cond``, which come from ``data`` and
    ``diffusion``).
* ``config.diffusion`` holds exactly the keyword arguments of
    :func:`tf_iddpm.diffusion.create_gaussian_diffusion`.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    # --- data -------------------------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    # "digits" (embedded default), "folder" (a directory of images) or any tfds name
    # ("cifar10", "imagenet_resized/64x64", "lsun/bedroom", ...) prepared in `data_dir`.
    data.name = "digits"
    data.data_dir = ""  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
    data.folder = ""  # root of the image folder when name == "folder"
    data.train_split = "train"
    data.eval_split = "test"
    data.image_size = 32
    data.num_channels = 3
    data.class_cond = False
    data.num_classes = 0  # 0 = unconditional; set by class-conditional configs
    data.low_res_size = 0  # > 0: also yield the area-downsampled image (super-resolution)
    data.shuffle_buffer = 10_000  # big TFRecord splits: records are permuted in windows this big
    data.strict = False  # folder source: error (True) or skip with a warning (False) on bad files
    data.random_flip = False  # the paper trains without flips (reference image_datasets.py)

    # --- model (tf_iddpm.factory.create_model kwargs) ---------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.num_channels = 128
    model.num_res_blocks = 2
    model.num_heads = 4
    model.num_heads_upsample = -1
    model.attention_resolutions = "16,8"
    model.dropout = 0.0
    model.use_scale_shift_norm = True
    model.channel_mult = ""  # "" = the reference's per-image-size default, else e.g. "1,2,2"
    # > 0: train that fraction of examples without their label (a "null" label: one more
    # embedding row), so that sampling can use classifier-free guidance (sample.guidance_scale).
    model.class_dropout = 0.0

    # --- diffusion (tf_iddpm.diffusion.create_gaussian_diffusion kwargs) --------------------------
    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.steps = 1000
    diffusion.learn_sigma = True
    diffusion.sigma_small = False
    diffusion.noise_schedule = "cosine"
    diffusion.use_kl = False
    diffusion.predict_xstart = False
    diffusion.rescale_timesteps = True
    diffusion.rescale_learned_sigmas = True
    diffusion.timestep_respacing = ""
    diffusion.cdf = "exact"  # "exact" (TFP normal CDF) or "approx" (the reference's tanh)

    # --- training ---------------------------------------------------------------------------------
    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 128  # global batch, split over replicas
    train.lr = 1e-4
    train.weight_decay = 0.0  # > 0 switches Adam to AdamW
    train.grad_clip = 0.0  # global-norm clip; 0 = off
    train.ema_rate = "0.9999"  # comma-separated list for several EMAs
    train.schedule_sampler = "uniform"  # or "loss-second-moment" (Section 3.3)
    train.num_steps = 500_000
    train.log_every = 100
    train.checkpoint_every = 10_000
    train.keep_checkpoints = 3
    train.sample_every = 0  # > 0: write a sample grid to TensorBoard every N steps
    train.fid_every = 0  # > 0: log FID and KID of EMA samples every N steps
    train.fid_num_samples = 256  # samples per training-time FID / KID (small N: see KID)
    train.fid_ref_batch = ""  # "" = fid.ref_batch
    train.fid_inception = ""  # "" = fid.inception
    train.jit_compile = False
    train.mixed_precision = "float32"  # or "mixed_bfloat16"
    # True: tf.config.experimental.enable_op_determinism() (bit-identical GPU runs, slower; CPU
    # runs are already deterministic, see docs/reproducibility.md).
    train.deterministic_ops = False

    # --- evaluation (bits/dim) --------------------------------------------------------------------
    config.eval = evaluation = ml_collections.ConfigDict()
    evaluation.batch_size = 64
    evaluation.num_samples = 0  # 0 = the whole split
    evaluation.timestep_respacing = ""  # "" = the full chain
    evaluation.clip_denoised = True
    evaluation.use_ema = True

    # --- sampling ---------------------------------------------------------------------------------
    config.sample = sample = ml_collections.ConfigDict()
    sample.num_samples = 64
    sample.batch_size = 64
    # The sampler (tf_iddpm.samplers): its kind, steps (network calls; for ancestral and DDIM a
    # respacing of the trained process: "50", "ddim50", "10,15,20", "" = every step), DDIM's eta,
    # x_0 clipping, and a solver's grid and order.
    # "ancestral" | "ddim" | the few-step solvers "dpmpp_2m" | "dpmpp_3m" | "dpmpp_2m_sde" | "unipc"
    sample.sampler = "ancestral"
    sample.timestep_respacing = "50"  # solvers: the number of network calls, e.g. "20"
    sample.eta = 0.0  # DDIM only
    sample.clip_denoised = True
    sample.grid = "logsnr"  # solvers: "logsnr" | "time_uniform" | "karras"
    sample.solver_order = 0  # unipc: 1-3 (0 = 2); the other kinds have a fixed order
    # Classifier-free guidance s: 1 = the conditional model as trained (default), 0 = its
    # unconditional prediction, > 1 guided.  Needs model.class_dropout > 0.
    sample.guidance_scale = 1.0
    sample.class_label = -1  # -1 = random labels for class-conditional models
    sample.use_ema = True

    # --- sample quality (run.py --mode=fid; tf_iddpm.quality_lib) -------------------------------
    config.fid = fid = ml_collections.ConfigDict()
    fid.ref_batch = ""  # evaluator-format reference batch .npz (arr_0 [+ mu, sigma, ...])
    fid.inception = ""  # local classify_image_graph_def.pb (the 2015 Inception graph)
    fid.num_samples = 10_000  # samples per evaluation (papers: 50 000)
    fid.batch_size = 64  # images per Inception forward pass
    fid.sweep = ""  # e.g. "25,50,100,250,full": FID vs sampling steps; "" = sample.*
    fid.sweep_samplers = "ancestral,ddim"  # the sweep's sampler kinds (tf_iddpm.samplers)
    fid.guidance_sweep = ""  # e.g. "0,1,1.5,2,3,5": the metrics against guidance_scale

    # --- export -----------------------------------------------------------------------------------
    config.export = export = ml_collections.ConfigDict()
    export.model_name = "iddpm"
    export.use_ema = True
    export.max_batch_size = 16

    return config
