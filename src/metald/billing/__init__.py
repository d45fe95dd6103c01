"""The billing adapter: metald's side of billing.v1.BillingService (core.ports.Billing).

`client.ConnectBilling` talks to the service over ConnectRPC (the existing billaged, or
`metald billing-sink`); `mock.MockBilling` only logs (UNKEY_METALD_BILLING_MOCK_MODE);
`codec` is the one translation between core's usage records and the wire messages, which
the sink uses too.
"""
