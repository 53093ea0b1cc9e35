'use strict';
// The contract suite with the unmodified v4 client, HTTP long-polling only.
require('./contract').defineContractSuite('polling');
