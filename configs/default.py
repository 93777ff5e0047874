"""Default experiment: CSCNN (small CNN) + DCN on the embedded synthetic data.

Command:
  python -m csctr.main --config=configs/default.py --workdir=/tmp/csctr_default

Config args (big_vision style, csctr/configlib.py) switch ablations without
new files, e.g.
  --config=configs/default.py:attention=cbam
  --config=configs/default.py:use_image=False,mlp_dims=(256,128)
  --config=configs/default.py:data.image_size=64
Model and top-level fields go by their bare name, any other by its dotted
path; booleans are true/false/1/0, tuples (a,b); a typo is an error.

Measured here (2 shared CPU cores, jax 0.10.2, 2000 steps): test AUC 0.707,
cold-item AUC 0.733, Bayes AUC 0.793 (103 s wall at load ~1 with round
2's code; 46 s, ~15 s of it compiling, with round 1's).
The no-image baseline (`:use_image=False`, 17 s): AUC 0.597, cold AUC 0.576.
Seed-averaged ablations: docs/results.md (benchmarks/ablations.py).
"""

import ml_collections

from csctr import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config, then `arg` ('key=value,...', csctr/configlib.py).

  Long because a config is one flat list of fields, read top to bottom; each
  field's default lives here and nowhere else.
  """
  config = ml_collections.ConfigDict()
  config.dataset = "synthetic"  # synthetic | sparse | fashion_mnist | byod | amazon
  config.byod_path = ""  # directory with items.csv, impressions.csv, images
  # Where prepared ArrayRecord shards are cached ('' -> $CSCTR_DATA_DIR or
  # ~/.cache/csctr). Each dataset config hashes to its own subdirectory.
  config.data_dir = ""
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.image_size = 32
  config.data.group_size = 25  # K impressions sharing one ad image
  config.data.groups_per_batch = 8  # G groups; B = G * K impression slots
  config.data.unique_images = 8  # U rows of the unique-image table (>= G)
  config.data.num_behaviors = 0  # L behaviour images per impression (DICM)
  # DICM: training stops if more than this fraction of a log window's
  # behaviour references is dropped for lack of unique_images rows (evals
  # never drop: their batches are cut to fit, csctr/data/pipeline.py).
  config.data.max_dropped_behavior_fraction = 0.05
  # Vocabularies (csctr/data/vocab.py), built on the train split: ids seen
  # fewer than min_count times there share the OOV row 0 with the ids never
  # seen (cold items then get the row rare items trained); hash_buckets > 0
  # hashes those ids into that many extra rows instead.
  # Item images in the prepared dataset (csctr/data/image_store.py): raw
  # uint8 | png (lossless) | jpeg | original (the files' bytes, Beam path);
  # encoded ones are decoded in the Grain map.
  config.data.image_storage = "raw"
  config.data.min_count = 1
  config.data.hash_buckets = 0
  config.data.eval_groups_per_batch = 32
  config.data.eval_unique_images = 32
  config.data.worker_count = 0  # Grain worker processes (0 = in-process)
  config.data.read_threads = 2  # Grain threads building batches ahead
  config.data.prefetch_batches = 8  # batches buffered ahead per process
  config.data.shuffle_seed = 0
  # Model selection: the last fraction of the train period becomes the
  # validation split, evaluated every eval_every steps; the best checkpoint
  # by validation AUC is kept and is what the final test eval scores
  # (csctr/training/loop.py). 0: no validation split, evals are on test.
  config.data.validation_fraction = 0.0
  # 'auto': group_size / groups_per_batch / unique_images from the prepared
  # data's impressions per image (csctr/data/autobatch.py); 'fixed': as set.
  config.data.batching = "fixed"
  config.data.target_packing = 0.8  # auto: least real / padded slots
  config.data.max_group_size = 25  # auto: largest K considered
  # Processes other than 0 wait this long for process 0 (or a Beam job) to
  # commit the prepared dataset to shared storage.
  config.data.prepare_timeout_s = 24 * 3600

  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.num_impressions = 200_000
  config.synthetic.num_items = 4_000
  config.synthetic.num_users = 2_000
  config.synthetic.num_categories = 8
  config.synthetic.test_fraction = 0.2  # last fraction of time is test
  config.synthetic.cold_item_fraction = 0.2  # items introduced only in test
  config.synthetic.seed = 0
  # Impressions generated and packed at a time: bounds prepare's memory
  # (partial image groups carry over to the next chunk, csctr/data/prepare.py).
  config.synthetic.chunk_size = 1 << 18

  # The sparse long-tail log (csctr/data/sparse_log.py, configs/sparse.py).
  config.sparse = ml_collections.ConfigDict()
  config.sparse.num_items = 20_000  # each shown 1-5 times in the whole log
  config.sparse.tail_exponent = 1.0  # P(n impressions) ~ n^-tail_exponent
  config.sparse.num_users = 2_000
  config.sparse.num_categories = 100
  config.sparse.test_fraction = 0.2
  config.sparse.cold_item_fraction = 0.1  # items introduced only in test
  config.sparse.negative_keep_rate = 0.25  # non-clicks kept in the log
  config.sparse.base_logit = -3.0  # before negative sampling
  config.sparse.visual_weight = 1.5
  config.sparse.seed = 0
  config.sparse.chunk_size = 1 << 16

  config.fashion_mnist = ml_collections.ConfigDict()
  config.fashion_mnist.path = "/usr/share/datasets/fashion-mnist"
  config.fashion_mnist.num_impressions = 200_000
  config.fashion_mnist.num_users = 2_000
  config.fashion_mnist.num_items = 4_000  # product images drawn from the files
  config.fashion_mnist.test_fraction = 0.2
  config.fashion_mnist.cold_item_fraction = 0.2  # drawn from the t10k file
  config.fashion_mnist.chunk_size = 1 << 18
  config.fashion_mnist.seed = 0
  # Principal components of each category's images that the simulated visual
  # score mixes (csctr/data/fashion_mnist.py says why 3).
  config.fashion_mnist.visual_components = 3

  # byod / amazon: reading config.byod_path (csctr/data/byod.py, docs/byod.md).
  config.byod = ml_collections.ConfigDict()
  config.byod.test_fraction = 0.2  # no split column: latest fraction is test
  config.byod.seed = 0  # no split column nor timestamp: seeded row hash
  config.byod.chunk_size = 65536  # impressions.csv rows read at a time
  config.byod.resize = "pad"  # pad (white letterbox) | stretch | crop
  config.byod.skip_bad_images = True  # False: a bad image is an error
  config.byod.image_cache_mb = 512  # keep decoded images if they fit
  # impressions: '' = impressions.csv | impressions.parquet | impressions/
  # (a folder of Parquet files) in byod_path; else a file, folder or glob.
  config.byod.impressions = ""
  # An image symlink resolving outside byod_path is refused unless True.
  config.byod.allow_external_links = False
  config.byod.num_threads = 0  # image decoding threads (0: min(8, cpus))

  # python -m csctr.prepare on a Beam runner (csctr/data/beam_prepare.py,
  # docs/data.md): ArrayRecord shards per split (~10^6 impressions each)
  # and image store shards. How, not what: not in the dataset's cache key.
  config.beam = ml_collections.ConfigDict()
  config.beam.num_shards = 8
  config.beam.image_shards = 8

  config.model = ml_collections.ConfigDict()
  config.model.use_image = True  # False: the no-image DCN baseline
  config.model.late_fusion = False  # True: frozen (stop-gradient) encoder
  # Workdir of a finished run whose image-encoder params initialise this one
  # ('' = random init); with late_fusion, a pretrained frozen CNN.
  config.model.encoder_init = ""
  config.model.use_category = True  # False: every image gets the OOV category
  config.model.backbone = "small"  # small | cnnf | resnet18
  config.model.small_channels = (32, 32, 64, 64)  # small: conv widths
  config.model.fc_dim = 4096  # cnnf: width of FC6 and FC7
  config.model.fc_dropout = 0.5  # cnnf: dropout after FC6 and FC7 (train)
  config.model.resnet_width = 64  # resnet18: stem width (stages w,2w,4w,8w)
  config.model.attention = "cscnn"  # cscnn | cscnn_channel | cscnn_spatial | cbam | se | none
  config.model.channel_prior_dim = 8  # C' of the channel prior Ac_k
  config.model.reduction = 4  # r of the shared channel-attention MLP
  config.model.spatial_kernel = 7
  config.model.visual_dim = 32  # d, the visual embedding size
  config.model.embed_dim = 16  # ID embedding size
  # ID tables get rows up to a multiple of this, so that they split evenly
  # over the devices they are sharded on (mesh.embedding_axes): their
  # device count must divide it (csctr/model/embeddings.py).
  config.model.table_row_multiple = 64
  # Training only: each ID becomes the OOV row 0 with this probability, so
  # the row cold ids are served from is trained (csctr/model/embeddings.py).
  config.model.id_dropout = 0.0
  # Cold start: an item_id in the OOV row adds a learned projection of its
  # image embedding (csctr/model/ctr.py); pair it with min_count/id_dropout
  # so the OOV row and the projection are trained.
  config.model.item_backoff = False
  config.model.behavior_pooling = "none"  # none | sum | max | attentive | multi_query
  config.model.head = "dcn"  # dcn | dcnv2 | lr | dnn
  config.model.cross_layers = 3
  config.model.cross_low_rank = 0  # dcnv2 only; 0 = full-rank matrix cross
  config.model.mlp_dims = (128, 64)
  config.model.dtype = "float32"  # float32 | bfloat16 (compute; params stay f32)

  config.optim = ml_collections.ConfigDict()
  # ID tables: updated on the rows a batch touches only, by one of
  # sgd | adagrad | rowwise_adagrad | lazy_adam | ftrl
  # (csctr/model/embeddings.py).
  config.optim.embed_optimizer = "adagrad"
  config.optim.embed_lr = 0.05
  config.optim.embed_initial_accumulator = 0.1  # adagrad, rowwise_adagrad, ftrl
  config.optim.embed_eps = 1e-7  # adagrad: under the sqrt; lazy_adam: added
  config.optim.embed_b1 = 0.9  # lazy_adam
  config.optim.embed_b2 = 0.999  # lazy_adam
  config.optim.embed_l1 = 0.0  # ftrl
  config.optim.embed_l2 = 0.0  # ftrl
  config.optim.embed_beta = 0.0  # ftrl
  config.optim.dense_optimizer = "adamw"  # adamw | adam | sgd
  config.optim.lr = 2e-3
  config.optim.weight_decay = 1e-4
  config.optim.warmup_steps = 100
  config.optim.schedule = "cosine"  # cosine | constant
  # Joint global norm of the dense gradients and the touched table rows'.
  config.optim.clip_norm = 1.0

  config.loss = "bce"  # bce | bpr
  config.num_train_steps = 2_000
  config.log_every = 50
  config.eval_every = 1_000
  config.checkpoint_every = 500
  config.keep_checkpoints = 2

  # Device mesh: axis sizes for ('data', 'model'); -1 fills with the devices left.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = (-1, 1)
  config.mesh.shard_embeddings = False  # row-shard ID tables ...
  # ... over these axes: ("model",), or ("data", "model") for every device.
  config.mesh.embedding_axes = ("model",)
  # Lay 'model' across processes (hosts) instead of within one: for ID tables
  # larger than a host; replica hosts then feed identical data blocks.
  config.mesh.model_across_processes = False
  # FSDP: shard every leaf of >= fsdp_min_size elements (params and optimizer
  # slots) along its largest dim that divides over 'data' (csctr/training/loop.py,
  # SHARDING_RULES); smaller ones stay replicated.
  config.mesh.fsdp = False
  config.mesh.fsdp_min_size = 1 << 18

  return configlib.apply_arg(config, arg)
