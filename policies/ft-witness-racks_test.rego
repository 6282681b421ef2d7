package cairn.ft

import rego.v1

site(witness, racks) := {"name": "hq", "witness": witness, "racks": racks, "nodes": [
	{"name": "n1", "rack": "r1"},
	{"name": "n2", "rack": "r1"},
	{"name": "n3", "rack": "r2"},
]}

ft_vm := {"name": "db", "site": "hq", "availability": "ft"}

test_ft_with_witness_and_two_racks_passes if {
	count(deny) == 0 with input as {"sites": [site("10.0.0.1:7400", [{"name": "r1"}, {"name": "r2"}])], "vms": [ft_vm]}
}

test_ft_without_witness_is_denied if {
	deny == {"vm db: availability ft needs a quorum witness, and site hq has none (add `witness address=\"HOST:PORT\"` to the site)"} with input as {"sites": [site(null, [{"name": "r1"}, {"name": "r2"}])], "vms": [ft_vm]}
}

test_ft_in_one_rack_is_denied if {
	deny == {"vm db: availability ft needs two racks so the pair survives a rack loss, and site hq has 1"} with input as {"sites": [site("w:1", [{"name": "r1"}])], "vms": [ft_vm]}
}

test_ha_vm_needs_nothing if {
	count(deny) == 0 with input as {"sites": [site(null, [{"name": "r1"}])], "vms": [{"name": "app", "site": "hq", "availability": "ha"}]}
}

test_placed_pair_in_one_rack_is_denied if {
	deny == {"vm db: primary on n1 and secondary on n2 share rack r1"} with input as {
		"sites": [site("w:1", [{"name": "r1"}, {"name": "r2"}])],
		"vms": [ft_vm],
		"placement": {"vms": [{"name": "db", "node": "n1", "secondary": "n2"}]},
	}
}

test_placed_pair_across_racks_passes if {
	count(deny) == 0 with input as {
		"sites": [site("w:1", [{"name": "r1"}, {"name": "r2"}])],
		"vms": [ft_vm],
		"placement": {"vms": [{"name": "db", "node": "n1", "secondary": "n3"}]},
	}
}
