# The two commands of the quick start. Everything else: deploy/local/stack help.
.PHONY: demo test model stack-down image image-test
demo: ## bring the stack up and run the CRM round trip live (leads in Postgres -> scores back in Postgres)
	scripts/demo.sh
test: ## run every test against the real local stack
	scripts/test.sh
stack-down: ## stop every local service
	deploy/local/stack down
model: ## rebuild models/default reproducibly (generator -> training -> parity vectors)
	scripts/model.sh
image: ## build the container image here with podman on a Debian base from mmdebstrap (localhost/leadscore:dev)
	deploy/image/build.sh localhost/leadscore:dev
image-test: image ## run the image's scorer, lookup and drift against the local stack (non-root, read-only), score through them
	deploy/local/stack up
	eval "$$(deploy/local/stack env)" && LEADSCORE_IMAGE=localhost/leadscore:dev cargo test -p leadscore --test image -- --ignored
