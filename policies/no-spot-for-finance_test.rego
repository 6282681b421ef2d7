package cairn

import rego.v1

test_finance_on_spot_is_denied if {
	deny == {"vm etl: finance workloads may not run on spot capacity"} with input as {"vms": [
		{"name": "etl", "tenant": "finance", "sla": {"class": "spot"}},
		{"name": "web", "tenant": "shop", "sla": {"class": "spot"}},
	]}
}

test_finance_on_reserved_passes if {
	count(deny) == 0 with input as {"vms": [{"name": "db", "tenant": "finance", "sla": {"class": "reserved"}}]}
}

test_other_tenants_may_use_spot if {
	count(deny) == 0 with input as {"vms": [{"name": "etl", "tenant": "shop", "sla": {"class": "spot"}}]}
}
