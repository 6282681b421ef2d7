package cairn.budget

import rego.v1

fixture_prices := {"currency": "USD", "warn_at": 0.8, "per_month": {
	"reserved": {"vcpu": 10, "memory_gib": 1, "storage_gib": 0.5},
	"spot": {"vcpu": 1, "memory_gib": 0, "storage_gib": 0},
}}

mk_vm(name, tenant, class, avail) := {
	"name": name, "tenant": tenant, "cpu": 2, "memory_bytes": 4 * 1073741824,
	"sla": {"class": class}, "availability": avail,
	"disks": [{"size_bytes": 10 * 1073741824}],
}

mk_tenant(name, monthly) := {"name": name, "budget": {"monthly": monthly, "currency": "USD"}}

# reserved, none: 2*10 + 4*1 = 24 compute, 10*0.5 = 5 storage: 29.
test_cost_of_one_vm if {
	tenant_cost.a == 29 with input as {"tenants": [mk_tenant("a", 100)], "vms": [mk_vm("x", "a", "reserved", "none")]} with data.cairn_prices as fixture_prices
}

# FT pays compute twice: 48 + 5.
test_ft_pays_for_its_secondary if {
	tenant_cost.a == 53 with input as {"tenants": [mk_tenant("a", 100)], "vms": [mk_vm("x", "a", "reserved", "ft")]} with data.cairn_prices as fixture_prices
}

test_over_budget_is_denied if {
	deny == {"tenant a: estimated monthly cost 58 USD is over its budget of 50 USD"} with input as {
		"tenants": [mk_tenant("a", 50)],
		"vms": [mk_vm("x", "a", "reserved", "none"), mk_vm("y", "a", "reserved", "none")],
	} with data.cairn_prices as fixture_prices
}

test_near_budget_warns if {
	warn == {"tenant a: estimated monthly cost 29 USD is 97% of its budget of 30 USD"} with input as {"tenants": [mk_tenant("a", 30)], "vms": [mk_vm("x", "a", "reserved", "none")]} with data.cairn_prices as fixture_prices
}

test_placement_counts_only_placed_instances if {
	# x is placed without a secondary (compute once), y is unplaced (storage only).
	tenant_cost.a == 34 with input as {
		"tenants": [mk_tenant("a", 100)],
		"vms": [mk_vm("x", "a", "reserved", "ft"), mk_vm("y", "a", "reserved", "none")],
		"placement": {"vms": [{"name": "x", "node": "n1", "secondary": null}, {"name": "y", "node": null}]},
	} with data.cairn_prices as fixture_prices
}

test_unknown_class_is_denied if {
	deny == {"vm x: no price for SLA class on-demand in policies/data/prices.json, so its cost is unknown"} with input as {"tenants": [], "vms": [mk_vm("x", "a", "on-demand", "none")]} with data.cairn_prices as fixture_prices
}

test_other_currency_is_reported if {
	warn == {"tenant e: budget is in EUR but prices are in USD; the budget is not checked"} with input as {"tenants": [{"name": "e", "budget": {"monthly": 1, "currency": "EUR"}}], "vms": []} with data.cairn_prices as fixture_prices
}

test_tenants_without_budget_pass if {
	count(deny) == 0 with input as {"tenants": [{"name": "a", "budget": null}], "vms": [mk_vm("x", "a", "reserved", "none")]} with data.cairn_prices as fixture_prices
}
