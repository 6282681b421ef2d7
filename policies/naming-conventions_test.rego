package cairn.naming

import rego.v1

test_conforming_vm_passes if {
	count(deny) == 0 with input as {"vms": [{"name": "db", "tags": {"app": "ledger", "tier": "db"}}]}
	count(warn) == 0 with input as {"vms": [{"name": "db", "tags": {"app": "ledger", "tier": "db"}}]}
}

test_upper_case_tag_key_is_denied if {
	deny == {"vm db: tag key `Owner` must be lower-case (write `owner`)"} with input as {"vms": [{"name": "db", "tags": {"app": "x", "Owner": "me"}}]}
}

test_unknown_tier_is_denied if {
	deny == {"vm db: tag tier=database is not a known tier (one of app, batch, cache, db, infra, web)"} with input as {"vms": [{"name": "db", "tags": {"app": "x", "tier": "database"}}]}
}

test_long_name_is_denied if {
	name := "a-very-long-virtual-machine-name-for-the-ledger"
	count(deny) == 1 with input as {"vms": [{"name": name, "tags": {"app": "x"}}]}
}

test_missing_app_tag_warns if {
	warn == {"vm etl: has no `app` tag; tag every VM with the application it belongs to (tag \"app\" \"NAME\")"} with input as {"vms": [{"name": "etl", "tags": {}}]}
}
