"""The job domain, importable without torch or ray: render parameters
(`jobs.params`), job identity (`jobs.identity`), prompt manifests
(`jobs.manifest`) and the output dataset (`jobs.dataset`)."""
