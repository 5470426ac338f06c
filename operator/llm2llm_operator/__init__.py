"""llm2llm-operator: the Kopf operator for AugmentationRun (llm2llm.io/v1alpha1), one Ray job per iteration."""
