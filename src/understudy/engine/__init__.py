"""The inference engine: a compact continuous-batching engine whose weights and KV cache live in the
memory service, and the HTTP serving process around it.

Wings, each importing only those after it:

    launch.py       `understudy serve`: one engine or a tensor-parallel group (build_engine, serve)
    parallel/       tensor-parallel groups: the leader (group), a worker rank (rank), their channel (comm)
    serving/        the serving process: HTTP app (app: skeleton, health; generate: the generation
                    routes; control: sleep/wake/quiesce; metrics), worker, bootstrap, promotion (the
                    failover path), lifecycle, memory watch, discovery announcements
    core/           the engine loop, scheduler, block manager, sequences, sampling, KV cache, CUDA graphs
    model/          model configs, the decoder, loading and publishing weights, tensor-parallel sharding
    layers/         attention (reference and Triton), fused Triton kernels
    options.py      the flags of `understudy serve` -> a ServeConfig (parse_serve_args, config_from_args)
    serve_config.py ServeConfig: the frozen, checked settings every wing takes (never a namespace)

Torch-free pieces shared with the frontend (OpenAI bodies, sampling params, tokenizer, detokenizer,
lifecycle state names) live in understudy.common.
"""
