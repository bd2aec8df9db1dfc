# The two commands of the quick start. Everything else: deploy/local/stack help.
.PHONY: demo test model stack-down
demo: ## bring the stack up and run the CRM round trip live (leads in Postgres -> scores back in Postgres)
	scripts/demo.sh
test: ## run every test against the real local stack
	scripts/test.sh
stack-down: ## stop every local service
	deploy/local/stack down
model: ## rebuild models/default reproducibly (generator -> training -> parity vectors)
	scripts/model.sh
