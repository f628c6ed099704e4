"""Evaluation of teacher and student, one package:

  evaluators  the evaluators by name (zero_shot, retrieval, agreement), built with their data
              before step 1 and run every so many steps (config.evals); the results table's
              rows (evaluate_models)
  evaluate    evaluate_zero_shot / evaluate_retrieval: one model on one dataset
  encode      jitted, mesh-aware encode_images / encode_texts / encode_token_ids,
              zero_shot_classifier
  metrics     zero_shot_eval, retrieval_eval, teacher_agreement, embedding_cosine (numpy)
  datasets    load_zero_shot_dataset: tfds, 'folder:PATH', 'synthetic'
  prompts     templates (80 OpenAI ImageNet, 7 simple, CIFAR, 'a photo of a {}.'), class names
  stats       model_stats: params, sizes, latency, throughput, peak memory
"""
